"""scripts/summarize_sweep.py on a real sweep of tiny jobs and on hand-made job folders."""

import csv
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "summarize_sweep.py"
FAST = ["logger=[csv]", "audio_encoder=mfcc", "adapter.hidden_dim=32",
        "federation.local_epochs=1", "federation.rounds=1", "generator.training_epochs=2",
        "generator.hidden_dim=16", "generator.latent_dim=4", "checkpoint.every=0"]
BETA = "generator.beta_warmup_ratio"
PNG = b"\x89PNG\r\n\x1a\n"


def summarize(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, check=False)


def table(markdown: str) -> list[dict[str, str]]:
    """The first Markdown table of ``markdown`` as one dict per body row."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header, *body = ([c.strip() for c in line.strip("|").split(" | ")] for line in lines)
    return [dict(zip(header, cells, strict=True)) for cells in body[1:]]


def stat(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values)


def test_summarizes_a_real_sweep(run_main: Callable[..., subprocess.CompletedProcess],
                                 tmp_path: Path) -> None:
    # One torch thread per job: these tiny jobs run ~10x slower on a busy 2-core machine when
    # torch's threads spin against other processes.
    done = run_main("-m", *FAST, "threads=1", f"{BETA}=0.5,1.0", "seed=0,1")
    assert done.returncode == 0, done.stderr[-2000:]
    (sweep,) = (tmp_path / "outputs" / "default" / "multiruns").iterdir()

    out = summarize(str(sweep))
    assert out.returncode == 0, out.stderr
    assert f"Wrote {sweep / 'summary.md'}, {sweep / 'summary.csv'} and " in out.stdout

    results = [json.loads((sweep / str(job) / "results.json").read_text()) for job in range(4)]
    rows = table((sweep / "summary.md").read_text())
    with (sweep / "summary.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    metrics = [k for k in rows[0] if k not in (BETA, "n")]
    assert metrics[:3] == ["global/acc", "synthetic/acc", "local/acc_mean"]
    assert [r[BETA] for r in rows] == [r[BETA] for r in csv_rows] == ["0.5", "1.0"]
    for row, csv_row in zip(rows, csv_rows, strict=True):
        jobs = [r for r in results if f"{BETA}={row[BETA]}" in r["environment"]["overrides"]]
        assert row["n"] == csv_row["n"] == "2" and len(jobs) == 2
        for metric in metrics:
            mean, std = stat([job["final"][metric] for job in jobs])
            assert row[metric] == f"{mean:.4g} ± {std:.4g}"
            assert float(csv_row[f"{metric} mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(csv_row[f"{metric} std"]) == pytest.approx(std, rel=1e-12)

    plots = {p.name: p.read_bytes() for p in (sweep / "plots").iterdir()}
    assert set(plots) == {f"{m.replace('/', '_')}_vs_{BETA}.png" for m in metrics}
    assert all(data.startswith(PNG) and len(data) > 1000 for data in plots.values())


def write_job(sweep: Path, number: int, overrides: list[str], status: str = "completed",
              granularity: str = "per_class", **final: float) -> None:
    """A job folder with a results.json as main.py writes it (the fields the script reads)."""
    results = {"experiment": "default", "status": status, "final": final, "best": {},
               "config": {"seed": 0, "generator": {"granularity": granularity}},
               "environment": {"overrides": ["federation.rounds=1", *overrides]}, "timings": {}}
    if status != "completed":
        results["error"] = f"RuntimeError: job {number}\nwent wrong"
    (sweep / str(number)).mkdir(parents=True)
    (sweep / str(number) / "results.json").write_text(json.dumps(results))


def test_lists_unfinished_jobs_and_summarizes_the_rest(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    per_class, unified = "generator=per_class", "generator=unified"
    write_job(sweep, 0, [per_class, f"{BETA}=0.5", "seed=0"], **{"global/acc": 0.5})
    write_job(sweep, 1, [per_class, f"{BETA}=0.5", "+seed=1"], **{"global/acc": 0.7})
    write_job(sweep, 2, [per_class, f"{BETA}=1.0", "seed=0"], **{"global/acc": 0.25})
    write_job(sweep, 3, [per_class, f"{BETA}=1.0", "seed=1"], "failed")
    write_job(sweep, 4, [unified, f"{BETA}=0.5", "seed=0"], "interrupted", "unified")
    (sweep / "5").mkdir()
    write_job(sweep, 6, [unified, f"{BETA}=1.0", "seed=1"], granularity="unified",
              **{"global/acc": 0.125, "gen/fd": 3.5})

    out = summarize(str(sweep), "--out", str(tmp_path / "summary"))
    assert out.returncode == 0, out.stderr
    expected = ["job 3 (failed) generator=per_class generator.beta_warmup_ratio=1.0 seed=1: "
                "RuntimeError: job 3 went wrong",
                "job 4 (interrupted) generator=unified generator.beta_warmup_ratio=0.5 seed=0: "
                "RuntimeError: job 4 went wrong",
                "job 5: no readable results.json"]
    assert "3 of 7 jobs did not complete:" in out.stdout
    assert all(f"  {line}\n" in out.stdout for line in expected)

    markdown = (tmp_path / "summary" / "summary.md").read_text()
    assert all(f"- {line}\n" in markdown for line in expected)
    mean, std = stat([0.5, 0.7])
    assert table(markdown) == [
        {"generator": "per_class", BETA: "0.5", "generator.granularity": "per_class", "n": "2",
         "global/acc": f"{mean:.4g} ± {std:.4g}", "gen/fd": "—"},
        {"generator": "per_class", BETA: "1.0", "generator.granularity": "per_class", "n": "1",
         "global/acc": "0.25", "gen/fd": "—"},
        {"generator": "unified", BETA: "1.0", "generator.granularity": "unified", "n": "1",
         "global/acc": "0.125", "gen/fd": "3.5"}]
    with (tmp_path / "summary" / "summary.csv").open() as handle:
        first = next(csv.DictReader(handle))
    assert float(first["global/acc std"]) == pytest.approx(std)
    assert first["gen/fd mean"] == first["gen/fd std"] == ""
    assert sorted(p.name for p in (tmp_path / "summary" / "plots").iterdir()) == [
        f"gen_fd_vs_{BETA}.png", f"global_acc_vs_{BETA}.png"]
    assert not (sweep / "summary.md").exists()


def test_one_line_errors(tmp_path: Path) -> None:
    write_job(tmp_path / "sweep", 0, [f"{BETA}=0.5"], "failed")
    write_job(tmp_path / "sweep", 1, [f"{BETA}=1.0"], "interrupted")
    for path, message in [(tmp_path / "sweep", "none of its 2 jobs completed"),
                          (tmp_path / "sweep" / "0" / "results.json", "not a folder"),
                          (tmp_path, "no job folders")]:
        out = summarize(str(path))
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr.startswith(f"error: {path}: {message}")
        assert out.stderr.count("\n") == 1
