"""The run-time cost of DP-SGD (``privacy=dp``) against the same run without it.

    python scripts/benchmark_privacy.py [--rounds 3] [--executor batched] [OVERRIDE ...]

For two runs, adapters alone (``generator=none``) and adapters with the default per-class
generators (their decoder variance learned in both arms, as ``privacy=dp`` needs), runs
``python main.py federation.rounds=ROUNDS executor=EXECUTOR OVERRIDE ...`` in subprocesses with
``privacy=none`` and with ``privacy=dp`` (a fixed noise multiplier, so the accountant's search
is not timed), on the same warm embedding cache, and prints each run's mean round time
(``time/round_s`` of ``results.json``, rounds 2 on: the first warms up) and their ratio, with
the load average: the machine may be shared, so quote the ratios of one run with its load.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def round_seconds(overrides: list[str], folder: Path) -> float:
    """Mean ``time/round_s`` after the first round of ``python main.py OVERRIDES``."""
    done = subprocess.run([sys.executable, str(REPO / "main.py"), *overrides,
                           f"hydra.run.dir={folder}"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "WANDB_MODE": "disabled"}, check=False)
    if done.returncode != 0:
        sys.exit(f"error: python main.py {' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
    rounds = json.loads((folder / "results.json").read_text())["rounds"]
    times = [r["time/round_s"] for r in rounds if r.get("round", 0) >= 2 and "time/round_s" in r]
    return sum(times) / len(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--executor", default="batched", choices=["batched", "sequential"])
    parser.add_argument("overrides", nargs="*", help="overrides for both runs")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        raise SystemExit("error: --rounds: give at least 2 (the first round is not timed)")
    common = ["logger=[csv]", "checkpoint.every=0", f"federation.rounds={args.rounds}",
              f"executor={args.executor}", *args.overrides]
    arms = {"adapters": ["generator=none"],
            "adapters + generators": ["generator.decoder_variance=learned"]}
    private = ["privacy=dp", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null"]
    before = os.getloadavg()[0]
    print(f"| run ({args.executor}) | privacy=none s/round | privacy=dp s/round | ratio |\n"
          "|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (arm, extra) in enumerate(arms.items()):
            plain = round_seconds([*common, *extra, "privacy=none"], Path(tmp) / f"plain{i}")
            dp = round_seconds([*common, *extra, *private], Path(tmp) / f"dp{i}")
            print(f"| {arm} | {plain:.2f} | {dp:.2f} | {dp / plain:.1f}x |", flush=True)
    print(f"(load average {before:.1f} before, {os.getloadavg()[0]:.1f} after)")


if __name__ == "__main__":
    main()
