"""On-disk cache of embeddings, keyed by what they were computed from.

A cache entry's key hashes the dataset's fingerprint (metadata plus each file's name, size and
modification time) and the encoder's fingerprint (its name, parameters and weights), so a changed
dataset or encoder setting never reuses a stale entry. Entries are written atomically and read
with ``torch.load(weights_only=True)``. A loaded entry is checked as a fresh result would be
(finite, ``[N, tokens, D]`` for audio); an unreadable or bad entry is a warning and a miss, never
a crash.
"""

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from flcore.config import TextOutput
from flcore.data.esc50 import AudioDataset, load_waveform
from flcore.encoders.text import class_prompts
from flcore.errors import DataError
from flcore.files import atomic_write_bytes

if TYPE_CHECKING:
    from flcore.config import Config
    from flcore.encoders.audio import AudioEncoder
    from flcore.encoders.text import TextEncoder

log = logging.getLogger(__name__)


def dataset_fingerprint(dataset: AudioDataset) -> str:
    """Hash of the metadata file and every used clip's name, size and mtime (a stat per file)."""
    digest = hashlib.sha256((dataset.root / "meta" / "esc50.csv").read_bytes())
    for clip in dataset.clips:
        stat = dataset.path(clip).stat()
        digest.update(f"{clip.filename}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(**parts: Any) -> str:
    """A stable short hash of JSON-serializable parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class EmbeddingCache:
    """A folder of ``<key>.pt`` files; ``folder=None`` disables caching."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None and not self._writable(self.folder):
            log.warning("embeddings.cache_dir=%s is not writable: running without the embedding "
                        "cache (set embeddings.cache_dir to a writable folder to keep "
                        "embeddings between runs)", self.folder)
            self.folder = None

    @staticmethod
    def _writable(folder: Path) -> bool:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(folder, os.W_OK | os.X_OK)

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.pt"

    def load(self, key: str) -> dict[str, Any] | None:
        """The entry stored under ``key``, or None if absent, disabled or unreadable."""
        if self.folder is None or not self.path(key).is_file():
            return None
        try:
            entry = torch.load(self.path(key), map_location="cpu", weights_only=True)
        except Exception as err:
            log.warning("Ignoring unreadable cache entry %s (%s); recomputing", self.path(key), err)
            return None
        if not isinstance(entry, dict):
            log.warning("Ignoring unreadable cache entry %s (a %s, not a dict); recomputing",
                        self.path(key), type(entry).__name__)
            return None
        return entry

    def store(self, key: str, payload: dict[str, Any]) -> None:
        """Write ``payload`` atomically under ``key`` (a no-op when disabled)."""
        if self.folder is None:
            return
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(self.path(key), buffer.getvalue())


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _tensor_problem(value: Any, shape: tuple[int | None, ...]) -> str | None:
    """Why ``value`` is not a finite float tensor of ``shape`` (None: any size), or None."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return f"not a float tensor ({type(value).__name__})"
    if value.ndim != len(shape) or any(n not in (None, m)
                                       for n, m in zip(shape, value.shape, strict=True)):
        wanted = ", ".join("*" if n is None else str(n) for n in shape)
        return f"shape {list(value.shape)}, expected [{wanted}]"
    if not torch.isfinite(value).all():
        return "NaN/inf values"
    return None


def _audio_dim(encoder: "AudioEncoder") -> int | None:
    """The feature size D of ``encoder``'s tokens, known without loading its model (None for an
    encoder this function does not know)."""
    from flcore.encoders.audio import AstEncoder, MfccEncoder, YamnetEncoder

    if isinstance(encoder, MfccEncoder):
        return encoder.n_mfcc * (3 if encoder.deltas else 1)
    if isinstance(encoder, YamnetEncoder):
        return 1024
    if isinstance(encoder, AstEncoder):
        return int(json.loads((encoder.folder / "config.json").read_text())["hidden_size"])
    return None


def _cached(cache: EmbeddingCache, key: str, field: str, shape: tuple[int | None, ...],
            **expected: Any) -> torch.Tensor | None:
    """The tensor ``field`` of the entry under ``key`` if the entry matches ``expected`` and the
    tensor is finite with ``shape``; a bad entry is a warning and a miss."""
    entry = cache.load(key)
    if entry is None or any(entry.get(k) != v for k, v in expected.items()):
        return None
    problem = _tensor_problem(entry.get(field), shape)
    if problem is not None:
        log.warning("Ignoring bad cache entry %s (%s: %s); recomputing", cache.path(key), field,
                    problem)
        return None
    return entry[field]


def embed_audio(dataset: AudioDataset, encoder: "AudioEncoder", cache: EmbeddingCache,
                batch_size: int, progress: bool = True) -> tuple[torch.Tensor, bool]:
    """Token sequences ``[N, L, D]`` of every clip (in ``dataset.clips`` order), and whether
    they came from the cache (an entry is checked as a fresh result is)."""
    filenames = [clip.filename for clip in dataset.clips]
    key = cache_key(kind="audio", dataset=dataset_fingerprint(dataset),
                    encoder=encoder.fingerprint())
    shape = (len(filenames), encoder.tokens, _audio_dim(encoder))
    tokens = _cached(cache, key, "tokens", shape, filenames=filenames)
    if tokens is not None:
        return tokens, True
    parts = []
    with tqdm(total=len(filenames), desc=f"{encoder.name} embeddings", unit="clip",
              disable=None if progress else True) as bar:
        for batch in _batches(dataset.clips, batch_size):
            waves = [load_waveform(dataset.path(clip), encoder.sample_rate) for clip in batch]
            parts.append(encoder.encode(waves))
            bar.update(len(batch))
    tokens = torch.cat(parts)
    bad = (~torch.isfinite(tokens)).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        raise DataError(f"{encoder.name} gave NaN/inf embeddings for {len(bad)} clip(s), e.g. "
                        f"{dataset.path(dataset.clips[bad[0]])}; check those files")
    cache.store(key, {"tokens": tokens, "filenames": filenames})
    return tokens, False


def embed_text(class_names: list[str], encoder: "TextEncoder", template: str,
               cache: EmbeddingCache) -> tuple[torch.Tensor, bool]:
    """One embedding (or token sequence) per class prompt, and whether it came from the cache."""
    prompts = class_prompts(class_names, template)
    key = cache_key(kind="text", prompts=prompts, encoder=encoder.fingerprint())
    shape = ((len(prompts), None) if encoder.output is TextOutput.pooled
             else (len(prompts), encoder.max_length, None))
    cached = _cached(cache, key, "embeddings", shape, prompts=prompts)
    if cached is not None:
        return cached, True
    embeddings = encoder.encode(prompts)
    cache.store(key, {"embeddings": embeddings, "prompts": prompts})
    return embeddings, False


@dataclass
class Embeddings:
    """Every clip's token sequence (``dataset.clips`` order) and every class's prompt embedding."""

    audio: torch.Tensor
    text: torch.Tensor
    audio_cached: bool
    text_cached: bool

    def summary(self) -> dict[str, Any]:
        return {"audio_shape": list(self.audio.shape), "text_shape": list(self.text.shape),
                "audio_cached": self.audio_cached, "text_cached": self.text_cached}


def encode_dataset(config: "Config", dataset: AudioDataset) -> Embeddings:
    """Audio and class-prompt embeddings of ``dataset`` with the configured encoders and cache."""
    from flcore.encoders.audio import build_audio_encoder
    from flcore.encoders.text import build_text_encoder

    cache = EmbeddingCache(config.embeddings.cache_dir if config.embeddings.cache else None)
    audio_encoder = build_audio_encoder(config.audio_encoder, Path(config.cache_dir) / "models")
    text_encoder = build_text_encoder(config.text_encoder)
    audio, audio_cached = embed_audio(dataset, audio_encoder, cache,
                                      config.audio_encoder.batch_size)
    text, text_cached = embed_text(dataset.class_names, text_encoder, config.text_encoder.prompt,
                                   cache)
    return Embeddings(audio, text, audio_cached, text_cached)
