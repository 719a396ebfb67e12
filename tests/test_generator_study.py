"""scripts/generator_study.py on two rows of tiny jobs (FedAvg and each node alone): its
intervals and paired differences recomputed by hand from the jobs' results.json, and a second
call that reuses the finished jobs."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG_GUARD_S, REPO, SMALL_DATASET, TINY_GENERATORS

SCRIPT = REPO / "scripts" / "generator_study.py"
TINY = [SMALL_DATASET, "audio_encoder=mfcc", "adapter.hidden_dim=32", "federation.local_epochs=1",
        *TINY_GENERATORS]
ROWS = ["fedavg alone", "local"]
# t_{0.975, 1} from a printed table of Student's t.
T975_1 = 12.7062


def study(cache_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDA2V_CACHE_DIR": str(cache_dir), "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=HANG_GUARD_S, check=False)


def test_rows_with_intervals_and_paired_differences(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    args = ["--seeds", "0", "1", "--rounds", "2", "--jobs", "1", "--out", str(out),
            "--only", *ROWS, "--", *TINY, "threads=1"]
    done = study(cache_dir, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((out / "study.json").read_text())["plan"]
    assert plan == [[row, seed] for row in ROWS for seed in (0, 1)]
    finals = {(row, seed): json.loads((out / str(n) / "results.json").read_text())["final"]
              for n, (row, seed) in enumerate(plan)}
    text = (out / "study.md").read_text()

    fedavg = [finals[ROWS[0], s]["global/acc"] for s in (0, 1)]
    local = [finals[ROWS[1], s]["global/acc"] for s in (0, 1)]
    mean, half = statistics.fmean(local), T975_1 * statistics.stdev(local) / math.sqrt(2)
    (row,) = [line for line in text.splitlines() if line.startswith(f"| {ROWS[1]} |")]
    shown, low_digits = row.split(" | ")[1].split(" ± ")
    assert float(shown) == pytest.approx(mean, abs=10 ** -len(low_digits.split(".")[-1]))
    assert float(low_digits) == pytest.approx(half, rel=0.05, abs=1e-4)

    diffs = [b - a for a, b in zip(fedavg, local, strict=True)]
    lines = text.splitlines()
    line = lines[lines.index("- local vs fedavg alone:") + 1]
    assert line.strip().startswith("- global/acc:"), line
    assert float(line.split()[2]) == pytest.approx(statistics.fmean(diffs), abs=5e-4)
    assert ("no detectable difference" in line) == (
        abs(statistics.fmean(diffs)) <= T975_1 * statistics.stdev(diffs) / math.sqrt(2))

    again = study(cache_dir, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 of 4 jobs already done" in again.stdout
    assert (out / "study.md").read_text() == text


def test_refuses_a_single_seed(tmp_path: Path) -> None:
    done = study(tmp_path, "--seeds", "0", "--out", str(tmp_path))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("error: --seeds: give at least 2")
