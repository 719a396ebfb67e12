"""Clips per second of the audio encoders on the bundled data, cold (computed) and warm (cached).

    python scripts/benchmark_encoders.py [--clips 2000] [--encoders yamnet mfcc]

Cold = decode WAVs + compute embeddings + write the cache entry; warm = load that entry. The
bundled dataset (400 five-second clips) is repeated to ``--clips`` clips for the warm-load figure
(the cache key covers the dataset, so the repeated set is written as its own ESC-50 folder).
Run it on an otherwise idle machine; quote the ratios, not the absolute numbers.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from flcore.config import AudioEncoderConfig, AudioEncoderName, SyntheticConfig
from flcore.data import synthetic
from flcore.data.embeddings import EmbeddingCache, embed_audio
from flcore.data.esc50 import load_esc50
from flcore.encoders.audio import build_audio_encoder


def repeated_dataset(source: Path, target: Path, clips: int) -> Path:
    """An ESC-50 folder of ``clips`` clips made by hard-linking the bundled clips repeatedly."""
    lines = (source / "meta" / "esc50.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    (target / "audio").mkdir(parents=True)
    (target / "meta").mkdir()
    out = [header]
    for i in range(clips):
        fields = rows[i % len(rows)].split(",")
        name = f"{fields[0][:-4]}-r{i // len(rows)}.wav"
        (target / "audio" / name).hardlink_to(source / "audio" / fields[0])
        out.append(",".join([name, *fields[1:]]))
    (target / "meta" / "esc50.csv").write_text("\n".join(out) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--encoders", nargs="+", default=["yamnet", "mfcc"])
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = all)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="feda2v-bench-"))
    try:
        source = synthetic.ensure_dataset(work / "cache", SyntheticConfig())
        dataset = load_esc50(repeated_dataset(source, work / "bench", args.clips))
        print(f"{len(dataset.clips)} clips of 5 s at 16 kHz, torch threads "
              f"{torch.get_num_threads()}")
        print(f"{'encoder':<8} {'shape':<18} {'cold clips/s':>13} {'warm load s':>12} "
              f"{'warm/cold speed-up':>19}")
        for name in args.encoders:
            config = AudioEncoderConfig(name=AudioEncoderName(name), threads=args.threads)
            encoder = build_audio_encoder(config, work / "models")
            cache = EmbeddingCache(work / f"emb-{name}")
            tic = time.perf_counter()
            tokens, _ = embed_audio(dataset, encoder, cache, config.batch_size, progress=False)
            cold = time.perf_counter() - tic
            tic = time.perf_counter()
            _, hit = embed_audio(dataset, build_audio_encoder(config, work / "models"), cache,
                                 config.batch_size, progress=False)
            warm = time.perf_counter() - tic
            assert hit, "the second pass must come from the cache"
            print(f"{name:<8} {list(tokens.shape)!s:<18} {len(dataset.clips) / cold:>13.1f} "
                  f"{warm:>12.3f} {cold / warm:>18.0f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
