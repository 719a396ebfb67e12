"""Render and judge images from a saved run, without retraining.

    python scripts/render.py RUN_DIR images=sd images.path=/models/sd15 \
        images.judge_path=/models/clip-vit-base-patch32 [images.KEY=VALUE ...]

RUN_DIR is a run folder with a checkpoint (``checkpoint.every`` > 0) whose adapter has a
sequence head (``text_encoder.output=sequence``), for example a run on a machine without the
pipeline's weights. The config the run was trained under applies, with the ``images=NAME``
option and ``key=value`` overrides of ``images.*`` (or of what a resume may change, such as
``device``). Images go to ``RUN_DIR/images/round_NNN/`` with ``judgements.csv`` and
``metrics.json``; the metrics are printed.
"""

import argparse
import logging
import sys
from pathlib import Path

from flcore.errors import FedA2VError
from flcore.offline import render_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run folder")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (images.*)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        metrics = render_run(args.run_dir, args.overrides, CONFIGS)
    except FedA2VError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for key, value in sorted(metrics.items()):
        print(f"{key}\t{value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
