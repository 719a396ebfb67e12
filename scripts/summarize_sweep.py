"""Summarize a sweep as a study: one arm per setting of the swept keys, seeds as replicates.

    python scripts/summarize_sweep.py outputs/<name>/multiruns/<stamp> [MORE ...] [--out DIR]
        [--metrics global/acc synthetic/acc ...] [--baseline KEY=VALUE ...] [--target 0.95]

Reads every job folder's ``results.json`` (rounds from ``metrics.csv`` where it has none). Several
multirun folders are read as one study (arms that differ in more than one key, such as the
baselines table of docs/experiments.md); their jobs are then named ``<folder>/<n>``.
Per arm: n, mean, sample std (ddof=1) and the 95% Student t interval over seeds of each metric,
best-val accuracy, rounds to a target accuracy and the area under the accuracy-per-round curve.
With ``--baseline``, each other arm's paired difference per seed against the baseline arm, its
interval and a paired t-test. Prints the key metrics, writes ``summary.md`` (the same view and
the paired table), ``summary.csv`` (every metric), ``jobs.csv`` (every completed job) and
``plots/*.png`` into the multirun folder or ``--out``. docs/experiments.md explains the table.
"""

import argparse
import csv
import math
import re
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path

from flcore import plots
from flcore.errors import FedA2VError
from flcore.files import require_writable_dir
from flcore.studies import (
    ACC,
    ACCEPTANCE,
    AUC,
    BEST,
    TO_TARGET,
    Arm,
    Job,
    Paired,
    analyse,
    columns_of,
    common_settings,
    curve,
    decimals,
    estimate,
    format_interval,
    group_arms,
    is_baseline,
    layout,
    load_jobs,
    metric_names,
    number,
    parse_baseline,
    swept_keys,
)

VIEW = (ACC, BEST, "synthetic/acc", ACCEPTANCE, TO_TARGET, AUC)
MISSING = "—"
NO_PAIRS = "n/a (needs >= 2 paired seeds)"
REFERENCES = {"gen/spread_ratio": (1.0, "real spread (1.0)"), "gen/dcr_ratio": (1.0, "1.0"),
              "gen/one_nn_acc": (0.5, "indistinguishable (0.5)")}
ACCURACY = re.compile(r"(^|/)(acc|acc_mean|balanced_acc|acc_auc)$")


def cell(arm: Arm, metric: str) -> str:
    """An arm's metric as ``mean ± 95% CI half-width``; rounds to target also counts the jobs
    that reached it when some did not."""
    est = arm.estimates.get(metric)
    if metric == TO_TARGET and arm.reached[1]:
        reached, total = arm.reached
        if not reached:
            return f"not reached (0/{total})"
        text = format_interval(est.mean, est.half)
        return text if reached == total else f"{text} ({reached}/{total} reached)"
    return MISSING if est is None else format_interval(est.mean, est.half)


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(r) for r in body)]


def arms_table(arms: list[Arm], shown: list[str], metrics: list[str]) -> list[str]:
    """One row per arm: the shown key columns, n, then each metric's ``mean ± CI``."""
    return markdown_table([*shown, "n", *metrics],
                          [[*(a.setting[c] or MISSING for c in shown), str(len(a.jobs)),
                            *(cell(a, m) for m in metrics)] for a in arms])


def paired_row(result: Paired) -> list[str]:
    """Pairs, difference, its interval, p-value and the verdict of one comparison."""
    if result.diff is None:
        return [str(result.pairs), NO_PAIRS, "", "", ""]
    diff = result.diff
    places = max(decimals(diff.half), 0) if diff.half else 4
    interval = f"[{diff.low:.{places}f}, {diff.high:.{places}f}]"
    verdict = ("no detectable difference" if not result.detectable
               else "higher" if diff.mean > 0 else "lower")
    p = MISSING if result.p is None else f"{result.p:.2g}"
    return [str(result.pairs), f"{diff.mean:+.{places}f}", interval, p, verdict]


def paired_table(arms: list[Arm], shown: list[str], metrics: list[str]) -> list[str]:
    """One row per compared arm and metric: pairs, mean difference, 95% CI, p, verdict."""
    body = [[*(a.setting[c] or MISSING for c in shown), m, *paired_row(a.versus[m])]
            for a in arms if a.versus for m in metrics if a.estimates.get(m)]
    return markdown_table([*shown, "metric", "pairs", "arm - baseline", "95% CI", "p",
                           "verdict"], body)


def fit_width(lines: list[str], width: int, keep: int) -> tuple[list[str], int]:
    """The table's lines with trailing columns dropped (never the first ``keep``) until every
    line fits in ``width`` characters, and how many were dropped."""
    rows = [line.strip("|").split(" | ") for line in lines]
    dropped = 0
    while max(len(line) for line in lines) > width and len(rows[0]) - dropped > keep + 1:
        dropped += 1
        lines = ["| " + " | ".join(c.strip() for c in r[:len(r) - dropped]) + " |" for r in rows]
    return lines, dropped


def report(arms: list[Arm], shown: list[str], follows: dict[str, str], same: list[str],
           view: list[str], baseline: dict[str, str] | None, target: float,
           notes: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The lines above the tables, the arms table and the paired table (empty without a
    baseline) of the view."""
    head = [*notes, "same in every job: " + ", ".join(same)] if same else list(notes)
    for column, leader in follows.items():
        pairs = dict.fromkeys(f"{a.setting[leader]}→{a.setting[column]}" for a in arms)
        head.append(f"{column} follows {leader}, shown once: {', '.join(pairs)}")
    reference = ("the baseline arm's" if baseline else "the arm's own")
    head += ["Cells: mean ± 95% CI half-width over the n seeds (Student t, 2 significant "
             "figures); a single value where n = 1.",
             f"{TO_TARGET}: first round where global/acc >= {target:g} × {reference} mean "
             "final global/acc; the mean is over the jobs that reached it. "
             f"{AUC}: mean global/acc over rounds 1..R."]
    head = [wrapped for line in head for wrapped in textwrap.wrap(
        line, 100, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)]
    paired_lines: list[str] = []
    if baseline:
        paired_lines = [f"Paired against {' '.join(f'{k}={v}' for k, v in baseline.items())}: "
                        "per-seed difference (arm - baseline)",
                        "over the seeds both ran, its 95% CI and the paired t-test's p.", "",
                        *paired_table(arms, shown, view)]
    return head, arms_table(arms, shown, view), paired_lines


def write_summary_csv(path: Path, arms: list[Arm], columns: list[str], metrics: list[str],
                      with_baseline: bool) -> None:
    """Every arm and metric: mean, std, ci_low, ci_high, n (and diff, its CI, pairs, p)."""
    stats = ("mean", "std", "ci_low", "ci_high", "n")
    versus = ("diff", "diff_ci_low", "diff_ci_high", "pairs", "p") if with_baseline else ()
    header = [*columns, "n", "target_acc",
              *(f"{m} {s}" for m in metrics for s in (*stats, *versus))]
    rows = []
    for arm in arms:
        row: list[object] = [*(arm.setting[c] or "" for c in columns), len(arm.jobs),
                             "" if arm.target is None else arm.target]
        for m in metrics:
            est = arm.estimates.get(m)
            row += ["", "", "", "", 0] if est is None else [
                est.mean, _blank(est.std), _blank(est.low), _blank(est.high), est.n]
            if with_baseline:
                pair = (arm.versus or {}).get(m)
                diff = pair.diff if pair else None
                row += ["", "", "", _blank(pair and pair.pairs), ""] if diff is None else [
                    diff.mean, diff.low, diff.high, pair.pairs, _blank(pair.p)]
        rows.append(row)
    _write_csv(path, header, rows)


def write_jobs_csv(path: Path, arms: list[Arm], columns: list[str], metrics: list[str]) -> None:
    """One row per completed job: its folder, seed, key columns, target and metric values."""
    header = ["job", "seed", *columns, "target_acc", *metrics]
    rows = []
    for arm in arms:
        for job, values in zip(arm.jobs, arm.values, strict=True):
            missed = job.name in arm.missed
            rows.append([job.name, _blank(job.seed), *(arm.setting[c] or "" for c in columns),
                         _blank(arm.target),
                         *("not reached" if m == TO_TARGET and missed else _blank(values.get(m))
                           for m in metrics)])
    _write_csv(path, header, rows)


def _blank(value: object) -> object:
    """The value, or an empty cell for None."""
    return "" if value is None else value


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    """A CSV file of a header and rows."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _file_name(text: str) -> str:
    """``text`` with every character a file name should not hold replaced by ``_``."""
    return re.sub(r"[^\w.-]", "_", text)


def references_of(metric: str, chance: float | None) -> list[tuple[float, str]]:
    """The reference lines of a metric: its ideal value, or chance for an accuracy."""
    if metric in REFERENCES:
        return [REFERENCES[metric]]
    if chance is not None and ACCURACY.search(metric):
        return [(chance, f"chance (1/{round(1 / chance)})")]
    return []


def off_axis(arms: list[Arm], key: str, metric: str,
             baseline: dict[str, str] | None) -> list[tuple[float, str]]:
    """The baseline arm's mean of ``metric`` as a reference line of a plot against ``key``,
    where that arm has no value of ``key`` (``privacy=none`` against
    ``privacy.target_epsilon``)."""
    if not baseline:
        return []
    name = " ".join(f"{k}={v}" for k, v in baseline.items())
    return [(est.mean, f"{name} (mean)") for arm in arms
            if is_baseline(arm, baseline) and arm.setting[key] is None
            and (est := arm.estimates.get(metric)) is not None]


def write_plots(folder: Path, arms: list[Arm], shown: list[str], metrics: list[str],
                rounds: int, chance: float | None,
                baseline: dict[str, str] | None = None) -> list[Path]:
    """A PNG per metric and numeric shown column, and global/acc per round per arm. A
    baseline arm without a value of the column (``privacy=none`` against
    ``privacy.target_epsilon``) is a dashed reference line there."""
    numeric = [k for k in shown if all(number(a.setting[k]) is not None for a in arms
                                       if a.setting[k] is not None)]
    folder.mkdir(exist_ok=True)
    paths = []
    for key in numeric:
        others = [c for c in shown if c != key]
        for metric in metrics:
            lines: dict[str, list[tuple[float, float, float]]] = {}
            for arm in arms:
                est = arm.estimates.get(metric)
                if est is not None and arm.setting[key] is not None:
                    label = ", ".join(f"{c}={arm.setting[c] or MISSING}" for c in others)
                    lines.setdefault(label, []).append(
                        (float(arm.setting[key]), est.mean, est.half or 0.0))
            paths.append(plots.plot_sweep_metric(
                folder / f"{_file_name(metric)}_vs_{_file_name(key)}.png", lines, key, metric,
                references_of(metric, chance) + off_axis(arms, key, metric, baseline)))
    curves = {}
    for arm in arms:
        per_round: dict[int, list[float]] = {}
        for job in arm.jobs:
            for r, acc in curve(job, ACC, rounds):
                per_round.setdefault(r, []).append(acc)
        points = [(r, e.mean, e.half or 0.0) for r, v in sorted(per_round.items())
                  if (e := estimate(v))]
        if points:
            curves[", ".join(f"{c}={arm.setting[c] or MISSING}" for c in shown)] = points
    if curves:
        paths.append(plots.plot_sweep_rounds(folder / "global_acc_per_round.png", curves, ACC,
                                             references_of(ACC, chance)))
    return paths


def failure_lines(jobs: Sequence[Job], keys: list[str]) -> list[str]:
    """A line per job that did not complete: its folder, status, swept overrides and error."""
    lines = []
    for job in jobs:
        if job.status == "completed":
            continue
        named = " ".join(f"{k}={job.overrides[k]}" for k in [*keys, "seed"] if k in job.overrides)
        status = "" if job.status == "unreadable" else f" ({job.status})"
        lines.append(f"job {job.name}{status}{' ' + named if named else ''}: {job.error}")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dirs", type=Path, nargs="+", metavar="sweep_dir",
                        help="outputs/<name>/multiruns/<stamp> (several: read as one study)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: the sweep folder; needed with several)")
    parser.add_argument("--metrics", nargs="+", metavar="KEY",
                        help="final metrics to report (default: the key metrics and gen/*)")
    parser.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE",
                        help="the arm to compare every other with, paired by seed (repeatable)")
    parser.add_argument("--target", type=float, default=0.95, metavar="F",
                        help="rounds to target: first round reaching F × the reference arm's "
                             "mean final global/acc (default 0.95)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    sweep_dirs: list[Path] = args.sweep_dirs
    sweep_dir = " ".join(map(str, sweep_dirs))
    hint = "pass a multirun folder, such as outputs/<name>/multiruns/<stamp>"
    for folder in sweep_dirs:
        if not folder.is_dir():
            raise SystemExit(f"error: {folder}: not a folder; {hint}")
    if len(sweep_dirs) > 1 and args.out is None:
        raise SystemExit("error: --out: give the folder for the summary of several sweeps")
    if not (math.isfinite(args.target) and args.target > 0):
        raise SystemExit(f"error: --target {args.target:g}: must be a number above 0")
    jobs = []
    for folder in sweep_dirs:
        found = load_jobs(folder)
        if not found:
            raise SystemExit(f"error: {folder}: no job folders (0/, 1/, ...); {hint}")
        if len(sweep_dirs) > 1:
            for job in found:
                job.name = f"{folder.name}/{job.name}"
        jobs += found
    done = [job for job in jobs if job.status == "completed"]
    if not done:
        raise SystemExit(f"error: {sweep_dir}: none of its {len(jobs)} jobs completed "
                         "(see each job's main.log)")
    metrics, absent = metric_names(jobs, args.metrics)
    if not metrics:
        raise SystemExit(f"error: no completed job reported any of {', '.join(args.metrics)}")
    keys = swept_keys(jobs)
    columns = columns_of(jobs, keys)
    try:
        out = require_writable_dir(args.out or sweep_dirs[0], "--out")
        arms = group_arms(jobs, columns)
        baseline = parse_baseline(args.baseline, arms, columns) if args.baseline else None
    except FedA2VError as err:
        raise SystemExit(f"error: {err}") from None
    lengths = sorted({job.last_round for job in done})
    rounds = lengths[0]
    notes = [] if len(lengths) == 1 else [
        f"warning: jobs ran {', '.join(map(str, lengths))} rounds; every metric is compared "
        f"at round {rounds}, the common minimum"]
    metrics = analyse(arms, metrics, rounds, len(lengths) == 1, baseline, args.target)
    shown, follows = layout(arms, columns)
    view = metrics if args.metrics else [m for m in VIEW if m in metrics]
    chances = {job.chance for job in done}
    chance = chances.pop() if len(chances) == 1 else None

    head, table, paired_lines = report(arms, shown, follows, common_settings(jobs, arms, columns),
                                       view, baseline, args.target, notes)
    failures = failure_lines(jobs, keys)
    plot_paths = write_plots(out / "plots", arms, shown, metrics, rounds, chance, baseline)
    write_summary_csv(out / "summary.csv", arms, columns, metrics, baseline is not None)
    write_jobs_csv(out / "jobs.csv", arms, columns, metrics)
    (out / "summary.md").write_text(markdown(sweep_dir, jobs, head, table, paired_lines,
                                             failures, plot_paths, out))

    if failures:
        print(f"{len(failures)} of {len(jobs)} jobs did not complete:")
        print("\n".join(f"  {line}" for line in failures))
    if absent:
        print(f"Not reported by any completed job, left out: {', '.join(absent)}")
    printed, dropped = fit_width(table, shutil.get_terminal_size((120, 24)).columns,
                                 len(shown) + 1)
    print("\n".join([*head, "", *printed]))
    if dropped:
        print(f"({dropped} column{'' if dropped == 1 else 's'} left out for the terminal's "
              "width: see summary.md)")
    if paired_lines:
        print("\n".join(["", *paired_lines]))
    print(f"Wrote {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'jobs.csv'} and "
          f"{len(plot_paths)} plot{'' if len(plot_paths) == 1 else 's'} in {out / 'plots'}")


def markdown(sweep_dir: str, jobs: Sequence[Job], head: list[str], table: list[str],
             paired_lines: list[str], failures: list[str], plot_paths: list[Path],
             out: Path) -> str:
    """summary.md: the counts, the printed view, the paired table, failures and plots."""
    completed = sum(job.status == "completed" for job in jobs)
    parts = [f"# Sweep summary: {sweep_dir}", "", f"{len(jobs)} jobs, {completed} completed.",
             "", *head, "", *table]
    if paired_lines:
        parts += ["", "## Against the baseline", "", *paired_lines]
    if failures:
        parts += ["", "## Jobs that did not complete", "", *(f"- {line}" for line in failures)]
    if plot_paths:
        parts += ["", "## Plots", "", "Error bars and bands: 95% CI over seeds (Student t).", "",
                  *(f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plot_paths)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
