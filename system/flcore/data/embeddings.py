"""On-disk cache of embeddings, keyed by what they were computed from, and the audio pass.

A cache entry's key hashes the dataset's fingerprint (metadata plus each file's name, size and
modification time) and the encoder's fingerprint (its name, parameters and weights), so a changed
dataset or encoder setting never reuses a stale entry. Entries are written atomically and read
with ``torch.load(weights_only=True)``. A loaded entry is checked as a fresh result would be
(finite, ``[N, tokens, D]`` for audio); an unreadable or bad entry is a warning and a miss, never
a crash.

Audio embeddings are stored in shards: ``<cache_dir>/<key>/shard-00000.pt`` holds clips
``0 .. shard_size - 1`` (in ``dataset.clips`` order) with their checksum
(:mod:`flcore.data.shards`), and so on, each written as soon as it is computed, then
``manifest.json`` once every shard is there. A killed pass therefore keeps its finished
shards, and the next pass computes only the missing or bad ones. Shards are computed
in the run's process (``workers=0``) or in ``workers`` spawned processes that each build the
encoder once; both give the same tensors (each shard is encoded in the same batches).
"""

import hashlib
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from flcore.data.esc50 import AudioDataset, load_waveform
from flcore.data.folder import FolderDataset
from flcore.data.shards import SHARD_FORMAT, checksum_problem, shard_payload, tensor_problem
from flcore.encoders.text import class_prompts
from flcore.errors import DataError
from flcore.files import atomic_write_bytes, atomic_write_text
from flcore.runtime import thread_share, use_threads

if TYPE_CHECKING:
    from flcore.config import Config
    from flcore.encoders.audio import AudioEncoder
    from flcore.encoders.text import TextEncoder, TextTargets

log = logging.getLogger(__name__)


DEFAULT_SHARD_SIZE = 256
MANIFEST = "manifest.json"


def _metadata_bytes(dataset: AudioDataset) -> bytes:
    """The dataset's metadata: its CSV, or for class folders the sorted class names."""
    if isinstance(dataset, FolderDataset):
        if dataset.metadata is not None:
            return dataset.metadata.read_bytes()
        return ("class folders\n" + "\n".join(dataset.class_names) + "\n").encode()
    return (dataset.root / "meta" / "esc50.csv").read_bytes()


def dataset_fingerprint(dataset: AudioDataset) -> str:
    """Hash of the metadata (the CSV, or the class folders' names) and every used clip's name,
    size and mtime (a stat per file)."""
    digest = hashlib.sha256(_metadata_bytes(dataset))
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

    def shard_path(self, key: str, index: int) -> Path:
        """Shard ``index`` of the sharded entry ``key``."""
        assert self.folder is not None
        return self.folder / key / f"shard-{index:05d}.pt"

    def manifest_path(self, key: str) -> Path:
        """The manifest of the sharded entry ``key``, written once all its shards are stored."""
        assert self.folder is not None
        return self.folder / key / MANIFEST

    def load(self, key: str) -> dict[str, Any] | None:
        """The entry stored under ``key``, or None if absent, disabled or unreadable."""
        if self.folder is None:
            return None
        return self._read(self.path(key))

    def load_shard(self, key: str, index: int) -> dict[str, Any] | None:
        """Shard ``index`` of ``key``, or None if absent, disabled or unreadable."""
        if self.folder is None:
            return None
        return self._read(self.shard_path(key, index))

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            log.warning("Ignoring unreadable cache entry %s (%s); recomputing", path, err)
            return None
        if not isinstance(entry, dict):
            log.warning("Ignoring unreadable cache entry %s (a %s, not a dict); recomputing",
                        path, type(entry).__name__)
            return None
        return entry

    @staticmethod
    def _write(path: Path, payload: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def store(self, key: str, payload: dict[str, Any]) -> None:
        """Write ``payload`` atomically under ``key`` (a no-op when disabled)."""
        if self.folder is not None:
            self._write(self.path(key), payload)

    def store_shard(self, key: str, index: int, payload: dict[str, Any]) -> None:
        """Write shard ``index`` of ``key`` atomically (a no-op when disabled)."""
        if self.folder is not None:
            self._write(self.shard_path(key, index), payload)

    def store_manifest(self, key: str, manifest: dict[str, Any]) -> None:
        """Write the manifest of ``key`` atomically (a no-op when disabled)."""
        if self.folder is not None:
            atomic_write_text(self.manifest_path(key), json.dumps(manifest, indent=1) + "\n")


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


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
    problem = tensor_problem(entry.get(field), shape)
    if problem is not None:
        log.warning("Ignoring bad cache entry %s (%s: %s); recomputing", cache.path(key), field,
                    problem)
        return None
    return entry[field]


def _encode_files(encoder: "AudioEncoder", paths: list[Path], batch_size: int,
                  bar: tqdm | None = None) -> torch.Tensor:
    """Tokens ``[len(paths), L, D]`` of the files, encoded ``batch_size`` at a time."""
    parts = []
    for batch in _batches(paths, batch_size):
        parts.append(encoder.encode([load_waveform(p, encoder.sample_rate) for p in batch]))
        if bar is not None:
            bar.update(len(batch))
    return torch.cat(parts)


_WORKER_ENCODER: "AudioEncoder | None" = None


def _start_worker(build: Callable[[], "AudioEncoder"], threads: int) -> None:
    """Initializer of an embedding worker process: its thread budget (torch's, and so YAMNet's
    onnxruntime session's) and its encoder, once."""
    global _WORKER_ENCODER
    use_threads(threads)
    _WORKER_ENCODER = build()


def _worker_shard(paths: list[str], batch_size: int) -> Any:
    """One shard's tokens, encoded in a worker process (a numpy array: plain pickling, no
    shared-memory handles)."""
    assert _WORKER_ENCODER is not None, "the worker's initializer builds the encoder"
    return _encode_files(_WORKER_ENCODER, [Path(p) for p in paths], batch_size).numpy()


def _same(encoder: "AudioEncoder") -> "AudioEncoder":
    return encoder


@dataclass
class _AudioPass:
    """One audio embedding pass over ``dataset``: which shards the cache holds, and the rest
    computed in-process or by worker processes, each stored as soon as it is done."""

    dataset: AudioDataset
    encoder: "AudioEncoder"
    cache: EmbeddingCache
    key: str
    shard_size: int
    batch_size: int

    def __post_init__(self) -> None:
        self.filenames = [clip.filename for clip in self.dataset.clips]
        n = len(self.filenames)
        self.ranges = [(a, min(a + self.shard_size, n)) for a in range(0, n, self.shard_size)]
        self.dim = _audio_dim(self.encoder)
        self.tokens: torch.Tensor | None = None

    def _put(self, index: int, tokens: torch.Tensor) -> None:
        start, stop = self.ranges[index]
        if self.tokens is None:
            self.tokens = torch.empty((len(self.filenames), *tokens.shape[1:]), dtype=tokens.dtype)
        self.tokens[start:stop] = tokens

    def load(self, index: int) -> bool:
        """Take shard ``index`` from the cache if it is there and good (a bad one is a warning)."""
        entry = self.cache.load_shard(self.key, index)
        if entry is None:
            return False
        start, stop = self.ranges[index]
        path = self.cache.shard_path(self.key, index)
        if entry.get("filenames") != self.filenames[start:stop]:
            log.warning("Ignoring bad cache entry %s (filenames: not the clips %d..%d); "
                        "recomputing", path, start, stop - 1)
            return False
        dim = self.dim or (self.tokens.shape[2] if self.tokens is not None else None)
        problem = tensor_problem(entry.get("tokens"), (stop - start, self.encoder.tokens, dim))
        if problem is not None:
            log.warning("Ignoring bad cache entry %s (tokens: %s); recomputing", path, problem)
            return False
        problem = checksum_problem(entry)
        if problem is not None:
            log.warning("Ignoring bad cache entry %s (%s); recomputing", path, problem)
            return False
        self._put(index, entry["tokens"])
        return True

    def finish(self, index: int, tokens: torch.Tensor) -> None:
        """Check a freshly computed shard, store it, and place it."""
        start, stop = self.ranges[index]
        bad = (~torch.isfinite(tokens)).flatten(1).any(1).nonzero().flatten().tolist()
        if bad:
            raise DataError(f"{self.encoder.name} gave NaN/inf embeddings for {len(bad)} clip(s), "
                            f"e.g. {self.dataset.path(self.dataset.clips[start + bad[0]])}; "
                            "check those files")
        self.cache.store_shard(self.key, index,
                               shard_payload(tokens, self.filenames[start:stop]))
        self._put(index, tokens)

    def paths(self, index: int) -> list[Path]:
        start, stop = self.ranges[index]
        return [self.dataset.path(clip) for clip in self.dataset.clips[start:stop]]

    def in_process(self, todo: list[int], bar: tqdm) -> None:
        for index in todo:
            self.finish(index, _encode_files(self.encoder, self.paths(index), self.batch_size,
                                             bar))

    def in_workers(self, todo: list[int], workers: int, build: Callable[[], "AudioEncoder"],
                   bar: tqdm) -> None:
        """Compute the shards ``todo`` in ``workers`` spawned processes; every finished shard is
        stored at once. After a failed shard no new shard starts, the running ones are still
        stored, and the first error is raised; an interrupt keeps the stored shards. The
        workers split this process's threads between them."""
        threads = thread_share(torch.get_num_threads(), workers)
        pool = ProcessPoolExecutor(max_workers=workers,
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(build, threads))
        error: BaseException | None = None
        try:
            futures = {pool.submit(_worker_shard, [str(p) for p in self.paths(i)],
                                   self.batch_size): i for i in todo}
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                index = futures[future]
                try:
                    self.finish(index, torch.from_numpy(future.result()))
                except Exception as err:
                    if error is None:
                        error = err
                        for other in futures:
                            other.cancel()
                    continue
                start, stop = self.ranges[index]
                bar.update(stop - start)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        if isinstance(error, BrokenProcessPool):
            raise RuntimeError(f"an embedding worker process died ({error}), e.g. out of memory: "
                               "lower embeddings.workers or audio_encoder.batch_size; finished "
                               "shards are kept and the next run computes only the rest"
                               ) from error
        if error is not None:
            raise error

    def manifest(self) -> dict[str, Any]:
        assert self.tokens is not None
        return {"format": SHARD_FORMAT, "encoder": self.encoder.name,
                "clips": len(self.filenames), "shard_size": self.shard_size,
                "shape": list(self.tokens.shape),
                "shards": [self.cache.shard_path(self.key, i).name
                           for i in range(len(self.ranges))]}


def embed_audio(dataset: AudioDataset, encoder: "AudioEncoder", cache: EmbeddingCache,
                batch_size: int, progress: bool = True, *,
                shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 0,
                build_encoder: Callable[[], "AudioEncoder"] | None = None,
                ) -> tuple[torch.Tensor, bool]:
    """Token sequences ``[N, L, D]`` of every clip (in ``dataset.clips`` order), and whether
    they all came from the cache.

    Shards of ``shard_size`` clips that the cache holds (each checked as a fresh result is) are
    loaded; the rest are computed in this process (``workers=0``, or only one shard to do) or in
    ``workers`` spawned processes, each building its encoder once with ``build_encoder`` (a
    picklable callable; default: a copy of ``encoder``), and stored one by one.
    """
    if not dataset.clips:
        raise DataError(f"{dataset.root}: no clips to embed")
    key = cache_key(kind="audio", dataset=dataset_fingerprint(dataset),
                    encoder=encoder.fingerprint(), shard_size=shard_size, format=SHARD_FORMAT)
    job = _AudioPass(dataset, encoder, cache, key, shard_size, batch_size)
    todo = [i for i in range(len(job.ranges)) if not job.load(i)]
    if todo:
        done = len(job.filenames) - sum(b - a for a, b in (job.ranges[i] for i in todo))
        if done:
            log.info("Embedding cache %s: %d of %d shards present, computing the other %d",
                     cache.folder / key if cache.folder else key, len(job.ranges) - len(todo),
                     len(job.ranges), len(todo))
        with tqdm(total=len(job.filenames), initial=done, desc=f"{encoder.name} embeddings",
                  unit="clip", disable=None if progress else True) as bar:
            if workers > 0 and len(todo) > 1:
                job.in_workers(todo, min(workers, len(todo)),
                               build_encoder or partial(_same, encoder), bar)
            else:
                job.in_process(todo, bar)
    if cache.enabled and (todo or not cache.manifest_path(key).is_file()):
        cache.store_manifest(key, job.manifest())
    assert job.tokens is not None
    return job.tokens, not todo


def embed_text(class_names: list[str], encoder: "TextEncoder", template: str,
               cache: EmbeddingCache) -> tuple["TextTargets", bool]:
    """Every class prompt's targets (pooled, and token sequences when the encoder gives them),
    and whether they came from the cache."""
    from flcore.encoders.text import TextTargets

    prompts = class_prompts(class_names, template)
    key = cache_key(kind="text", prompts=prompts, encoder=encoder.fingerprint())
    shapes = {"embeddings": (len(prompts), None), "sequence": (len(prompts), None, None),
              "pooled_raw": (len(prompts), None)}
    found = {f: _cached(cache, key, f, shapes[f], prompts=prompts) for f in encoder.fields}
    if all(v is not None for v in found.values()):
        return TextTargets(found["embeddings"], found.get("sequence"),
                           found.get("pooled_raw")), True
    targets = encoder.encode(prompts)
    cache.store(key, {**targets.tensors(), "prompts": prompts})
    return targets, False


@dataclass
class Embeddings:
    """Every clip's token sequence (``dataset.clips`` order) and every class's prompt targets."""

    audio: torch.Tensor
    text: "TextTargets"
    audio_cached: bool
    text_cached: bool

    def summary(self) -> dict[str, Any]:
        shapes = {f"text_{k}_shape" if k != "embeddings" else "text_shape": list(v.shape)
                  for k, v in self.text.tensors().items()}
        return {"audio_shape": list(self.audio.shape), **shapes,
                "audio_cached": self.audio_cached, "text_cached": self.text_cached}


def encode_dataset(config: "Config", dataset: AudioDataset) -> Embeddings:
    """Audio and class-prompt embeddings of ``dataset`` with the configured encoders and cache."""
    from flcore.encoders.audio import build_audio_encoder
    from flcore.encoders.text import build_text_encoder

    cache = EmbeddingCache(config.embeddings.cache_dir if config.embeddings.cache else None)
    model_dir = Path(config.cache_dir) / "models"
    audio_encoder = build_audio_encoder(config.audio_encoder, model_dir)
    text_encoder = build_text_encoder(config.text_encoder)
    audio, audio_cached = embed_audio(dataset, audio_encoder, cache,
                                      config.audio_encoder.batch_size,
                                      shard_size=config.embeddings.shard_size,
                                      workers=config.embeddings.workers,
                                      build_encoder=partial(build_audio_encoder,
                                                            config.audio_encoder, model_dir))
    text, text_cached = embed_text(dataset.class_names, text_encoder, config.text_encoder.prompt,
                                   cache)
    return Embeddings(audio, text, audio_cached, text_cached)
