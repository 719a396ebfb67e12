"""The generator study on the bundled data: every row at several seeds, with 95% intervals and
paired differences against its reference row.

    python scripts/generator_study.py [--seeds 0 1 2] [--rounds 10] [--jobs 2] [--out DIR]
                                      [--only ROW ...] [-- OVERRIDE ...]

Each (row, seed) is one ``python main.py`` job in ``DIR/<n>/`` (default
``outputs/generator_study``); a job that already completed there is reused, so an interrupted
study continues where it stopped. Jobs run ``--jobs`` at a time, each with its share of the
cores. Rows: the warm-up sweep, ``beta_max=1`` (the true ELBO), decoder means without
``sample_noise``, the seed's ``likelihood=mse``, the closed-form ``model=gaussian``
floor, the class-agnostic ``model=noise`` control, FedAvg alone, fedavg+synthetic at every
granularity, and the ``centralized`` and ``local`` references. The table gives mean ± the 95%
half-width over seeds; the comparisons give the paired per-seed difference (same seed = same
split and initialisation) with its interval, and say when it is not detectable. Rounds to target
count the rounds until ``global/acc`` first reaches ``--target`` x FedAvg's mean final accuracy.
Everything printed is also written to ``DIR/study.md``.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "system"))

from flcore.runtime import available_cpus, thread_share  # noqa: E402
from flcore.studies import (  # noqa: E402
    ACC,
    Arm,
    Job,
    area_under_curve,
    curve,
    estimate,
    format_interval,
    paired,
    read_job,
    rounds_to_target,
)

GROUPS = ("+generator.class_groups={tonal:[rising_chirp,falling_chirp,high_whistle,siren_wail],"
          "impulsive:[click_train,heartbeat_thump,bell_ring],"
          "noisy:[rain_like_noise,buzzing_insect,low_engine_hum]}")
DEFAULT = "per_class vae (default)"
FEDAVG = "fedavg alone"
ROWS: dict[str, tuple[str, ...]] = {
    DEFAULT: (),
    "warmup 0.25": ("generator.beta_warmup_ratio=0.25",),
    "warmup 0.75": ("generator.beta_warmup_ratio=0.75",),
    "warmup 1.0": ("generator.beta_warmup_ratio=1.0",),
    "beta_max=1 (the ELBO)": ("generator.beta_max=1",),
    "sample_noise=false": ("generator.sample_noise=false",),
    "likelihood=mse (seed)": ("generator.likelihood=mse",),
    "model=gaussian (floor)": ("generator.model=gaussian",),
    "model=noise (control)": ("generator.model=noise",),
    "unified vae": ("generator=unified",),
    "per_group vae": ("generator=per_group", GROUPS),
    FEDAVG: ("generator=none",),
    "centralized": ("generator=none", "federation.algorithm=centralized"),
    "local": ("generator=none", "federation.algorithm=local"),
}
TO_TARGET = "rounds to target"
AUC = "acc AUC"
GEN = ("synthetic/acc", "gen/recall", "gen/coverage", "gen/precision", "gen/kl",
       "gen/active_units", "gen/spread_ratio", "gen/fd", "gen/train_rows/recall")
COLUMNS = (ACC, TO_TARGET, AUC, "synthetic/acceptance_rate", *GEN, "gen/pairwise_distance",
           "gen/train_rows/pairwise_distance")
GENERATOR_VS = ("synthetic/acc", "gen/recall", "gen/coverage", "gen/precision", "gen/kl",
                "gen/spread_ratio", "gen/fd")
ADAPTER_VS = (ACC, AUC, TO_TARGET)
#: (row, reference row, metrics): the paired comparisons the study reports.
COMPARISONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (DEFAULT, "model=gaussian (floor)", GENERATOR_VS),
    *((f"warmup {r}", DEFAULT, GENERATOR_VS) for r in ("0.25", "0.75", "1.0")),
    *((row, DEFAULT, GENERATOR_VS) for row in ("beta_max=1 (the ELBO)", "sample_noise=false",
                                              "likelihood=mse (seed)")),
    *((row, FEDAVG, ADAPTER_VS) for row in (DEFAULT, "unified vae", "per_group vae",
                                            "model=noise (control)", "model=gaussian (floor)")),
    (DEFAULT, "model=noise (control)", ADAPTER_VS),
    (FEDAVG, "centralized", (ACC,)),
    ("local", FEDAVG, (ACC,)),
)


def job_command(overrides: tuple[str, ...], seed: int, rounds: int, folder: Path,
                threads: int) -> list[str]:
    """The ``main.py`` command of one job, writing its run folder to ``folder``."""
    return [sys.executable, str(REPO / "main.py"), *overrides, f"seed={seed}",
            f"federation.rounds={rounds}", "checkpoint.every=0", "logger=[csv]",
            f"threads={threads}", f"hydra.run.dir={folder}"]


def completed(folder: Path) -> bool:
    return read_job(folder).status == "completed"


def run_jobs(plan: list[tuple[str, int]], rounds: int, out: Path, jobs: int,
             extra: tuple[str, ...]) -> None:
    """Run every (row, seed) of ``plan`` not yet completed in ``out/<n>/``, ``jobs`` at a time."""
    threads = thread_share(available_cpus(), jobs, None)
    todo = [(n, row, seed) for n, (row, seed) in enumerate(plan)
            if not completed(out / str(n))]
    print(f"{len(plan) - len(todo)} of {len(plan)} jobs already done in {out}", flush=True)

    def one(item: tuple[int, str, int]) -> None:
        n, row, seed = item
        tic = time.perf_counter()
        log = out / f"{n}.log"
        with log.open("w") as handle:
            code = subprocess.run(job_command((*ROWS[row], *extra), seed, rounds, out / str(n),
                                              threads), cwd=REPO, stdout=handle,
                                  stderr=subprocess.STDOUT, env={**os.environ}, check=False)
        state = "done" if code.returncode == 0 else f"FAILED (exit {code.returncode}, see {log})"
        print(f"{state}: {row}, seed {seed} ({time.perf_counter() - tic:.0f} s)", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))


def arm_values(arm: Arm, rounds: int, target: float | None) -> None:
    """Each job's final metrics, its accuracy AUC and rounds to ``target``."""
    arm.values = []
    for job in arm.jobs:
        values = dict(job.final)
        accuracy = curve(job, ACC, rounds)
        auc = area_under_curve(accuracy, rounds)
        if auc is not None:
            values[AUC] = auc
        hit = None if target is None else rounds_to_target(accuracy, target)
        if hit is not None:
            values[TO_TARGET] = float(hit)
        arm.values.append(values)


def cell(arm: Arm, metric: str) -> str:
    found = estimate([v[metric] for v in arm.values if metric in v])
    if found is None:
        return "—"
    missing = len(arm.jobs) - found.n
    return format_interval(found.mean, found.half) + (f" ({missing} never)" if missing and
                                                     metric == TO_TARGET else "")


def comparison(arm: Arm, base: Arm, metric: str) -> str:
    result = paired(arm.by_seed(metric), base.by_seed(metric))
    if result.diff is None:
        return f"{metric}: under 2 paired seeds"
    d = result.diff
    if d.half == 0 and d.mean == 0:
        return f"{metric}: identical in every seed"
    verdict = "detectable" if result.detectable else "no detectable difference"
    return (f"{metric}: {d.mean:+.4g} [{d.mean - d.half:+.3g}, {d.mean + d.half:+.3g}], "
            f"p={result.p if result.p is None else f'{result.p:.2g}'}, {verdict}")


def report(arms: dict[str, Arm], rounds: int, target: float, seeds: list[int]) -> list[str]:
    """The table and the paired comparisons as markdown lines."""
    lines = [f"Generator study: {len(seeds)} seeds ({', '.join(map(str, seeds))}), {rounds} "
             f"rounds; mean ± 95% half-width over seeds. {TO_TARGET}: first round with "
             f"global/acc >= {target:g} x FedAvg's mean final accuracy.", "",
             f"| row | {' | '.join(COLUMNS)} |", f"|---|{'---|' * len(COLUMNS)}"]
    lines += [f"| {name} | {' | '.join(cell(arm, c) for c in COLUMNS)} |"
              for name, arm in arms.items()]
    lines += ["", "Paired differences (row - reference, per seed; 95% interval, paired t-test):"]
    for row, reference, metrics in COMPARISONS:
        if row in arms and reference in arms:
            lines.append(f"- {row} vs {reference}:")
            lines += [f"  - {comparison(arms[row], arms[reference], m)}" for m in metrics
                      if all(any(m in v for v in arms[a].values) for a in (row, reference))]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time (default 2)")
    parser.add_argument("--target", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "generator_study")
    parser.add_argument("--only", nargs="+", choices=list(ROWS), metavar="ROW",
                        help=f"run these rows only (of: {'; '.join(ROWS)})")
    parser.add_argument("overrides", nargs="*", help="overrides for every job (after --)")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
        raise SystemExit("error: --seeds: give at least 2 distinct seeds (3 or more for a "
                         "useful interval)")
    rows = args.only or list(ROWS)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = [(row, seed) for row in rows for seed in args.seeds]
    plan_file = out / "study.json"
    if plan_file.exists() and json.loads(plan_file.read_text())["plan"][: len(plan)] != [
            list(p) for p in plan]:
        raise SystemExit(f"error: {out} holds a study with other rows or seeds; pass another "
                         "--out")
    plan_file.write_text(json.dumps({"plan": plan, "overrides": args.overrides}, indent=1))
    run_jobs(plan, args.rounds, out, args.jobs, tuple(args.overrides))
    jobs: dict[str, list[Job]] = {}
    for n, (row, _) in enumerate(plan):
        job = read_job(out / str(n))
        if job.status == "completed":
            jobs.setdefault(row, []).append(job)
    arms = {row: Arm({"row": row}, jobs[row]) for row in rows if row in jobs}
    fedavg = arms.get(FEDAVG)
    finals = [j.final[ACC] for j in fedavg.jobs] if fedavg else []
    target = args.target * sum(finals) / len(finals) if finals else None
    for arm in arms.values():
        arm_values(arm, args.rounds, target)
    lines = report(arms, args.rounds, args.target, args.seeds)
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(["", *lines, "", f"Wrote {out / 'study.md'}"]))


if __name__ == "__main__":
    main()
