"""Clips per second of the embedding pass in-process and in worker processes.

    python scripts/benchmark_embedding_pass.py [--encoder mfcc|yamnet] [--clips-per-class 40]
        [--workers 2] [--shard-size 50] [--repeats 3] [--root FOLDER]

Writes (once) a class-folder collection of 10 synthetic classes x ``--clips-per-class`` clips of
5 s at 16 kHz, then times the cache-less embedding pass with ``embeddings.workers=0`` (torch on
all cores, and on one thread) and with ``--workers`` worker processes (one thread each), in
interleaved repetitions; prints the medians and checks every pass gives the same tokens. Quote
ratios from one run: the machine is shared.
"""

import argparse
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import soundfile as sf
import torch

from flcore.config import AudioEncoderConfig, AudioEncoderName, SyntheticConfig
from flcore.data.embeddings import EmbeddingCache, embed_audio
from flcore.data.folder import load_folder
from flcore.data.synthetic import CLASSES, synthesize_clip
from flcore.encoders.audio import build_audio_encoder


def write_collection(root: Path, per_class: int) -> None:
    """``root/<class>/<i>.wav`` for the synthetic classes."""
    clip = SyntheticConfig(duration_s=5.0, sample_rate=16000)
    for target, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            sf.write(root / label / f"{i}.wav", synthesize_clip(target, i, clip), 16000,
                     subtype="PCM_16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="mfcc", choices=["mfcc", "yamnet"])
    parser.add_argument("--clips-per-class", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()
    root = args.root or Path(tempfile.gettempdir()) / f"feda2v-collection-{args.clips_per_class}"
    if not root.is_dir():
        write_collection(root, args.clips_per_class)
    dataset = load_folder(root)
    build = partial(build_audio_encoder, AudioEncoderConfig(name=AudioEncoderName(args.encoder)),
                    Path(tempfile.gettempdir()) / "feda2v-models")
    cores = os.cpu_count() or 1
    setups = {f"workers=0, {cores} threads": (0, cores), "workers=0, 1 thread": (0, 1),
              f"workers={args.workers}, 1 thread each": (args.workers, cores)}
    times: dict[str, list[float]] = {label: [] for label in setups}
    reference = None
    for _ in range(args.repeats):
        for label, (workers, threads) in setups.items():
            torch.set_num_threads(threads)
            tic = time.perf_counter()
            tokens, _ = embed_audio(dataset, build(), EmbeddingCache(None), 32, progress=False,
                                    shard_size=args.shard_size, workers=workers,
                                    build_encoder=build)
            times[label].append(time.perf_counter() - tic)
            reference = tokens if reference is None else reference
            assert torch.allclose(tokens, reference, rtol=0, atol=1e-6), label
    print(f"{args.encoder}: {len(dataset.clips)} clips of 5 s, load average "
          f"{os.getloadavg()[0]:.1f}")
    for label, seconds in times.items():
        median = statistics.median(seconds)
        print(f"  {label:<28} {median:7.2f} s  {len(dataset.clips) / median:7.0f} clips/s")


if __name__ == "__main__":
    main()
