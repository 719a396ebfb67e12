"""Write the bundled synthetic dataset (ESC-50 layout) into any folder.

    python scripts/make_synthetic_dataset.py /tmp/synthetic --seed 0 --clips-per-class 72

The other parameters are the benchmark's (``dataset=synthetic``: docs/experiments.md).

Then run on it with ``python main.py dataset=esc50 dataset.root=/tmp/synthetic`` (or keep
``dataset=synthetic`` and pass ``dataset.root``).
"""

import argparse
import time
from pathlib import Path

from flcore.config import SyntheticConfig
from flcore.data.synthetic import CLASSES, write_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write audio/ and meta/esc50.csv into")
    default = SyntheticConfig()
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--clips-per-class", type=int, default=default.clips_per_class)
    parser.add_argument("--duration-s", type=float, default=default.duration_s)
    parser.add_argument("--sample-rate", type=int, default=default.sample_rate)
    args = parser.parse_args()
    config = SyntheticConfig(clips_per_class=args.clips_per_class, duration_s=args.duration_s,
                             sample_rate=args.sample_rate, seed=args.seed)
    tic = time.perf_counter()
    write_dataset(args.out, config)
    print(f"{len(CLASSES)} classes x {config.clips_per_class} clips written to {args.out} "
          f"in {time.perf_counter() - tic:.1f} s")


if __name__ == "__main__":
    main()
