"""scripts/summarize_sweep.py on a real sweep of tiny jobs and on hand-made job folders."""

import csv
import itertools
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from conftest import HANG_GUARD_S, SWEEP_JOB
from flcore.studies import analyse, columns_of, group_arms, load_jobs, swept_keys

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from summarize_sweep import off_axis

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "summarize_sweep.py"
FAST = SWEEP_JOB
BETA = "generator.beta_warmup_ratio"
PNG = b"\x89PNG\r\n\x1a\n"
# t_{0.975, df} from a printed table of Student's t (df = 1, 2).
T975 = {1: 12.7062, 2: 4.3027}


def summarize(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, check=False)


def table(markdown: str) -> list[dict[str, str]]:
    """The first Markdown table of ``markdown`` as one dict per body row."""
    lines = list(itertools.takewhile(lambda line: line.startswith("| "), itertools.dropwhile(
        lambda line: not line.startswith("| "), markdown.splitlines())))
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
    assert (f"Wrote {sweep / 'summary.md'}, {sweep / 'summary.csv'}, {sweep / 'jobs.csv'} "
            "and ") in out.stdout

    results = [json.loads((sweep / str(job) / "results.json").read_text()) for job in range(4)]
    rows = table((sweep / "summary.md").read_text())
    with (sweep / "summary.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [BETA, "n", "global/acc", "best/global/acc", "synthetic/acc",
                             "synthetic/acceptance_rate", "conv/rounds_to_target",
                             "conv/acc_auc"]
    assert [r[BETA] for r in rows] == [r[BETA] for r in csv_rows] == ["0.5", "1.0"]
    for row, csv_row in zip(rows, csv_rows, strict=True):
        jobs = [r for r in results if f"{BETA}={row[BETA]}" in r["environment"]["overrides"]]
        assert row["n"] == csv_row["n"] == "2" and len(jobs) == 2
        for metric in ["global/acc", "synthetic/acc", "synthetic/acceptance_rate",
                       "local/acc_mean", "gen/fd"]:
            mean, std = stat([job["final"][metric] for job in jobs])
            half = T975[1] * std / math.sqrt(2)
            assert float(csv_row[f"{metric} mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(csv_row[f"{metric} std"]) == pytest.approx(std, rel=1e-12)
            low, high = float(csv_row[f"{metric} ci_low"]), float(csv_row[f"{metric} ci_high"])
            assert (low, high) == pytest.approx((mean - half, mean + half), abs=1e-5 * half)
        # One round: the area under the accuracy curve is that round's accuracy.
        auc, _ = stat([job["rounds"][-1]["global/acc"] for job in jobs])
        assert float(csv_row["conv/acc_auc mean"]) == pytest.approx(auc, rel=1e-12)

    plots = {p.name: p.read_bytes() for p in (sweep / "plots").iterdir()}
    assert "global_acc_per_round.png" in plots and f"gen_fd_vs_{BETA}.png" in plots
    assert all(data.startswith(PNG) and len(data) > 1000 for data in plots.values())

    versus = summarize(str(sweep), "--baseline", f"{BETA}=0.5")
    assert versus.returncode == 0, versus.stderr
    (paired,) = [r for r in table(versus.stdout.split("Paired against")[1])
                 if r["metric"] == "global/acc"]
    acc = {(next(o for o in r["environment"]["overrides"] if o.startswith(BETA)),
            r["config"]["seed"]): r["final"]["global/acc"] for r in results}
    diffs = [acc[(f"{BETA}=1.0", s)] - acc[(f"{BETA}=0.5", s)] for s in (0, 1)]
    assert paired["pairs"] == "2"
    assert float(paired["arm - baseline"]) == pytest.approx(statistics.fmean(diffs), abs=1e-4)


def write_job(sweep: Path, number: int, overrides: list[str], status: str = "completed",
              granularity: str = "per_class", seed: int = 0, curve: Sequence[float] = (),
              **final: float) -> None:
    """A job folder with a results.json as main.py writes it (the fields the script reads):
    ``curve`` is global/acc per round from round 1, its last value the final global/acc."""
    rounds = [{"round": 0, "partition/num_classes": 10},
              *({"round": r, "global/acc": acc} for r, acc in enumerate(curve, 1))]
    final = {"global/acc": curve[-1], **final} if curve else final
    results = {"experiment": "default", "status": status, "final": final, "best": {},
               "config": {"seed": seed, "generator": {"granularity": granularity}},
               "environment": {"overrides": ["federation.rounds=1", *overrides]}, "timings": {},
               "rounds": rounds}
    if status != "completed":
        results["error"] = f"RuntimeError: job {number}\nwent wrong"
    (sweep / str(number)).mkdir(parents=True)
    (sweep / str(number) / "results.json").write_text(json.dumps(results))


def test_lists_unfinished_jobs_and_summarizes_the_rest(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    per_class, unified = "generator=per_class", "generator=unified"
    write_job(sweep, 0, [per_class, f"{BETA}=0.5", "seed=0"], **{"global/acc": 0.5})
    write_job(sweep, 1, [per_class, f"{BETA}=0.5", "+seed=1"], seed=1, **{"global/acc": 0.7})
    write_job(sweep, 2, [per_class, f"{BETA}=1.0", "seed=0"], **{"global/acc": 0.25})
    write_job(sweep, 3, [per_class, f"{BETA}=1.0", "seed=1"], "failed")
    write_job(sweep, 4, [unified, f"{BETA}=0.5", "seed=0"], "interrupted", "unified")
    (sweep / "5").mkdir()
    write_job(sweep, 6, [unified, f"{BETA}=1.0", "seed=1"], granularity="unified", seed=1,
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
    # 0.6 ± t(1) * 0.1414 / sqrt(2) = 0.6 ± 1.27; the granularity follows the generator.
    assert table(markdown) == [
        {"generator": "per_class", BETA: "0.5", "n": "2", "global/acc": "0.6 ± 1.3"},
        {"generator": "per_class", BETA: "1.0", "n": "1", "global/acc": "0.25"},
        {"generator": "unified", BETA: "1.0", "n": "1", "global/acc": "0.125"}]
    assert ("generator.granularity follows generator, shown once: per_class→per_class, "
            "unified→unified\n") in out.stdout
    assert "same in every job: federation.rounds=1\n" in out.stdout
    _, std = stat([0.5, 0.7])
    with (tmp_path / "summary" / "summary.csv").open() as handle:
        first = next(csv.DictReader(handle))
    assert float(first["global/acc std"]) == pytest.approx(std)
    assert first["gen/fd mean"] == first["gen/fd std"] == "" and first["gen/fd n"] == "0"
    assert first["generator.granularity"] == "per_class"
    assert sorted(p.name for p in (tmp_path / "summary" / "plots").iterdir()) == [
        f"gen_fd_vs_{BETA}.png", f"global_acc_vs_{BETA}.png"]
    assert not (sweep / "summary.md").exists()


def test_the_acceptance_rate_joins_the_view_where_jobs_report_it(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for number, (model, rate, rounds) in enumerate([("vae", 0.75, 3.0), ("noise", 0.25, 1.0)]):
        write_job(sweep, number, [f"generator.model={model}"], curve=[0.5],
                  **{"synthetic/acceptance_rate": rate, "synthetic/accepted_rounds": rounds})
    out = summarize(str(sweep))
    assert out.returncode == 0, out.stderr
    arms = {r["generator.model"]: r for r in table(out.stdout)}
    assert arms["vae"]["synthetic/acceptance_rate"] == "0.75"
    assert arms["noise"]["synthetic/acceptance_rate"] == "0.25"
    chosen = summarize(str(sweep), "--metrics", "synthetic/accepted_rounds")
    assert chosen.returncode == 0, chosen.stderr
    arms = {r["generator.model"]: r for r in table(chosen.stdout)}
    assert (arms["vae"]["synthetic/accepted_rounds"], arms["noise"]["synthetic/accepted_rounds"]
            ) == ("3", "1")


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


# A study by hand: generator=none (the baseline) against per_class, seeds 0-2, four rounds.
CURVES = {("none", 0): [0.2, 0.3, 0.4, 0.5], ("none", 1): [0.3, 0.4, 0.58, 0.6],
          ("none", 2): [0.6, 0.65, 0.7, 0.7], ("per_class", 0): [0.57, 0.6, 0.6, 0.6],
          ("per_class", 1): [0.4, 0.6, 0.7, 0.8], ("per_class", 2): [0.5, 0.9, 1.0, 1.0]}
# synthetic/acc: per_class - none = 0.19, 0.2, 0.21 per seed (an interval without 0).
SYNTHETIC = {("none", 0): 0.3, ("none", 1): 0.4, ("none", 2): 0.5,
             ("per_class", 0): 0.49, ("per_class", 1): 0.6, ("per_class", 2): 0.71}


def write_study(sweep: Path) -> None:
    for number, (generator, seed) in enumerate(CURVES):
        write_job(sweep, number, [f"generator={generator}", f"seed={seed}"], seed=seed,
                  curve=CURVES[generator, seed],
                  **{"synthetic/acc": SYNTHETIC[generator, seed]})


def test_intervals_paired_differences_and_convergence_by_hand(tmp_path: Path) -> None:
    write_study(tmp_path / "sweep")
    out = summarize(str(tmp_path / "sweep"), "--baseline", "generator=none", "--target", "0.95")
    assert out.returncode == 0, out.stderr
    arms = {r["generator"]: r for r in table(out.stdout)}
    # global/acc: none 0.5, 0.6, 0.7 (mean 0.6, sd 0.1): 0.6 ± 4.3027 * 0.1 / sqrt(3) = 0.248.
    assert arms["none"]["global/acc"] == "0.60 ± 0.25"
    # per_class 0.6, 0.8, 1.0 (sd 0.2): 0.8 ± 0.497.
    assert arms["per_class"]["global/acc"] == "0.80 ± 0.50"
    # Target 0.95 × 0.6 (the baseline's mean final) = 0.57. none: seed 0 never reaches it,
    # seed 1 at round 3, seed 2 at round 1: mean 2, sd sqrt(2), ± 12.706 * sqrt(2) / sqrt(2).
    assert arms["none"]["conv/rounds_to_target"] == "2 ± 13 (2/3 reached)"
    # per_class: rounds 1, 2, 2 (0.57 counts as reached): mean 5/3, sd sqrt(1/3), ± 1.434.
    assert arms["per_class"]["conv/rounds_to_target"] == "1.7 ± 1.4"
    # AUC: the mean accuracy over rounds 1..4; per_class: 0.5925, 0.625, 0.85.
    auc = [0.5925, 0.625, 0.85]
    half = T975[2] * statistics.stdev(auc) / math.sqrt(3)
    with (tmp_path / "sweep" / "summary.csv").open() as handle:
        rows = {r["generator"]: r for r in csv.DictReader(handle)}
    assert float(rows["per_class"]["conv/acc_auc mean"]) == pytest.approx(0.689166667)
    assert float(rows["per_class"]["conv/acc_auc ci_high"]) == pytest.approx(
        0.689166667 + half, rel=1e-4)
    assert float(rows["none"]["target_acc"]) == pytest.approx(0.57)

    paired = {r["metric"]: r for r in table(out.stdout.split("Paired against")[1])}
    # global/acc differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, CI 0.2 ± 0.248 holds 0;
    # t = 0.2 / (0.1 / sqrt(3)) = 3.4641 on 2 df: p = 1 - t / sqrt(2 + t²) = 0.07418.
    assert paired["global/acc"]["pairs"] == "3"
    assert paired["global/acc"]["arm - baseline"] == "+0.20"
    assert paired["global/acc"]["95% CI"] == "[-0.05, 0.45]"
    assert paired["global/acc"]["p"] == "0.074"
    assert paired["global/acc"]["verdict"] == "no detectable difference"
    assert float(rows["per_class"]["global/acc p"]) == pytest.approx(
        1 - 3.4641016 / math.sqrt(2 + 3.4641016**2), rel=1e-6)
    assert float(rows["per_class"]["global/acc diff_ci_low"]) == pytest.approx(
        0.2 - T975[2] * 0.1 / math.sqrt(3), rel=1e-4)
    # synthetic/acc differences 0.19, 0.2, 0.21: 0.2 ± 0.0248, above 0.
    assert paired["synthetic/acc"]["95% CI"] == "[0.175, 0.225]"
    assert paired["synthetic/acc"]["verdict"] == "higher"
    # Rounds to target: seeds 1 and 2 reached in both arms: 2 - 3 and 2 - 1, 2 pairs.
    assert paired["conv/rounds_to_target"]["pairs"] == "2"
    assert paired["conv/rounds_to_target"]["arm - baseline"] == "+0"
    assert "no detectable difference" in paired["conv/rounds_to_target"]["verdict"]

    with (tmp_path / "sweep" / "jobs.csv").open() as handle:
        jobs = {(r["generator"], r["seed"]): r for r in csv.DictReader(handle)}
    assert jobs["none", "0"]["conv/rounds_to_target"] == "not reached"
    assert jobs["none", "1"]["conv/rounds_to_target"] == "3"
    assert float(jobs["none", "1"]["conv/acc_auc"]) == pytest.approx(0.47)
    markdown = (tmp_path / "sweep" / "summary.md").read_text()
    assert "## Against the baseline" in markdown and "| per_class | synthetic/acc | 3 |" in markdown


def test_several_sweeps_are_one_study(tmp_path: Path) -> None:
    """The study by hand split over two multirun folders (one per arm, as when arms differ in
    more than one key) gives the single folder's tables; the summary needs --out."""
    write_study(tmp_path / "whole")
    for number, (generator, seed) in enumerate(CURVES):
        write_job(tmp_path / generator, number, [f"generator={generator}", f"seed={seed}"],
                  seed=seed, curve=CURVES[generator, seed],
                  **{"synthetic/acc": SYNTHETIC[generator, seed]})
    whole = summarize(str(tmp_path / "whole"), "--baseline", "generator=none")
    split = summarize(str(tmp_path / "none"), str(tmp_path / "per_class"), "--baseline",
                      "generator=none", "--out", str(tmp_path / "study"))
    assert whole.returncode == split.returncode == 0, split.stderr
    assert table(split.stdout) == table(whole.stdout)
    paired = split.stdout.split("Paired against")[1]
    assert table(paired) == table(whole.stdout.split("Paired against")[1])
    assert (tmp_path / "study" / "summary.md").read_text().startswith(
        f"# Sweep summary: {tmp_path / 'none'} {tmp_path / 'per_class'}")
    refused = summarize(str(tmp_path / "none"), str(tmp_path / "per_class"))
    assert refused.returncode == 1
    assert refused.stderr == "error: --out: give the folder for the summary of several sweeps\n"


def test_a_baseline_off_the_swept_axis_is_a_reference_line(tmp_path: Path) -> None:
    """An epsilon sweep and its privacy=none arm: the plots against the epsilon show the
    baseline's mean (by hand) as a reference, and its png is written."""
    for seed, (a, b, none) in enumerate([(0.2, 0.4, 0.5), (0.3, 0.5, 0.7)]):
        write_job(tmp_path / "dp", 2 * seed, ["privacy=dp", "privacy.target_epsilon=1",
                                               f"seed={seed}"], seed=seed, curve=[a])
        write_job(tmp_path / "dp", 2 * seed + 1, ["privacy=dp", "privacy.target_epsilon=4",
                                                   f"seed={seed}"], seed=seed, curve=[b])
        write_job(tmp_path / "none", seed, ["privacy=none", f"seed={seed}"], seed=seed,
                  curve=[none])
    done = summarize(str(tmp_path / "dp"), str(tmp_path / "none"), "--baseline",
                     "privacy=none", "--out", str(tmp_path / "study"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "study" / "plots" / "global_acc_vs_privacy.target_epsilon.png").exists()
    jobs = [*load_jobs(tmp_path / "dp"), *load_jobs(tmp_path / "none")]
    arms = group_arms(jobs, columns_of(jobs, swept_keys(jobs)))
    analyse(arms, ["global/acc"], 1, True, {"privacy": "none"}, 0.95)
    lines = off_axis(arms, "privacy.target_epsilon", "global/acc", {"privacy": "none"})
    assert lines == [(pytest.approx(0.6), "privacy=none (mean)")]
    assert off_axis(arms, "privacy.target_epsilon", "global/acc", None) == []


def test_each_arm_is_its_own_reference_without_a_baseline(tmp_path: Path) -> None:
    write_study(tmp_path / "sweep")
    out = summarize(str(tmp_path / "sweep"))
    assert out.returncode == 0, out.stderr
    assert "Paired against" not in out.stdout
    arms = {r["generator"]: r for r in table(out.stdout)}
    # per_class: target 0.95 × 0.8 = 0.76; seed 0 never (0.6), seed 1 round 4, seed 2 round 2.
    assert arms["per_class"]["conv/rounds_to_target"] == "3 ± 13 (2/3 reached)"
    assert "the arm's own mean final" in out.stdout


def test_fewer_than_two_pairs_and_unequal_rounds(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_job(sweep, 0, ["generator=none", "seed=0"], seed=0, curve=[0.5, 0.6])
    write_job(sweep, 1, ["generator=none", "seed=1"], seed=1, curve=[0.5, 0.7])
    write_job(sweep, 2, ["generator=per_class", "seed=1"], seed=1, curve=[0.2, 0.4, 0.9])
    write_job(sweep, 3, ["generator=per_class", "seed=2"], seed=2, curve=[0.2, 0.6, 0.9])
    out = summarize(str(sweep), "--baseline", "generator=none")
    assert out.returncode == 0, out.stderr
    assert ("warning: jobs ran 2, 3 rounds; every metric is compared at round 2, the common "
            "minimum\n") in out.stdout
    arms = {r["generator"]: r for r in table(out.stdout)}
    assert arms["per_class"]["global/acc"] == "0.5 ± 1.3"  # 0.4, 0.6 at round 2, not 0.9
    paired = {r["metric"]: r for r in table(out.stdout.split("Paired against")[1])}
    assert paired["global/acc"]["pairs"] == "1"
    assert paired["global/acc"]["arm - baseline"] == "n/a (needs >= 2 paired seeds)"
    assert "no detectable difference" not in out.stdout


@pytest.mark.parametrize(("spec", "message"), [
    ("generator=gaussian", "--baseline generator=gaussian: no completed job has "
                           "generator=gaussian; values present: none, per_class"),
    ("seed=0", "--baseline seed=0: seed is not a swept key; swept keys: generator"),
    ("generator", "--baseline generator: expected KEY=VALUE")])
def test_bad_baseline_is_one_error_line(tmp_path: Path, spec: str, message: str) -> None:
    write_study(tmp_path / "sweep")
    out = summarize(str(tmp_path / "sweep"), "--baseline", spec)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == f"error: {message}\n"
