"""Summarize a sweep: one row per setting of the swept keys, seeds pooled as replicates.

    python scripts/summarize_sweep.py outputs/<name>/multiruns/<stamp> [--out DIR]
        [--metrics global/acc synthetic/acc ...]

Reads every job folder's ``results.json``. The swept keys are the override keys whose values
differ between jobs; ``seed`` is replication, so each row holds the mean ± sample std (ddof=1)
of its seeds' ``final`` metrics, with their count in ``n``. When the generator granularity
(``generator.granularity`` in the config) varies, it becomes a column too. Writes
``summary.md``, ``summary.csv`` (separate mean and std columns) and ``plots/*.png`` (each
metric against each numeric swept key, one line per setting of the other columns) into the
multirun folder or ``--out``. Jobs that failed, were interrupted or left no readable
``results.json`` are listed, and the rest is summarized.
"""

import argparse
import csv
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from omegaconf import OmegaConf

from flcore.errors import FedA2VError
from flcore.files import require_writable_dir

DEFAULT_METRICS = ("global/acc", "synthetic/acc", "local/acc_mean", "generator/kl_loss",
                   "generator/recon_loss")
GRANULARITY = "generator.granularity"
MISSING = "—"


@dataclass
class Job:
    """One job folder: its status, its overrides as ``{key: value}`` and what it reported."""

    name: str
    status: str
    overrides: dict[str, str]
    error: str
    final: dict[str, float]
    granularity: str


@dataclass
class Row:
    """One setting of the columns, its completed jobs' count and each metric's (mean, std);
    std is None for a single value, the pair is None where no job reported the metric."""

    setting: dict[str, str | None]
    n: int
    stats: dict[str, tuple[float, float | None] | None]


def parse_override(text: str) -> tuple[str, str]:
    """``key=value``, ``+key=value``, ``++key=value`` or ``~key`` as ``(key, value)``."""
    key, _, value = text.lstrip("+~").partition("=")
    return key, value


def _number(text: str | None) -> float | None:
    """The value as a finite float, or None when it is not a number."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _hydra_overrides(folder: Path) -> dict[str, str]:
    """The overrides Hydra recorded in ``.hydra/overrides.yaml``, to name a job that left no
    results.json; empty when there are none."""
    try:
        listed = OmegaConf.load(folder / ".hydra" / "overrides.yaml")
    except (OSError, ValueError):
        return {}
    return dict(parse_override(str(o)) for o in listed) if OmegaConf.is_list(listed) else {}


def read_job(folder: Path) -> Job:
    """The job in ``folder``; status ``unreadable`` when its results.json cannot be read."""
    try:
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        results = None
    if not isinstance(results, dict):
        return Job(folder.name, "unreadable", _hydra_overrides(folder),
                   "no readable results.json", {}, "")
    final = {k: float(v) for k, v in results.get("final", {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    generator = results.get("config", {}).get("generator") or {}
    return Job(folder.name, str(results.get("status", "unknown")),
               dict(parse_override(o) for o in results.get("environment", {}).get("overrides", [])),
               " ".join(str(results.get("error") or "").split()), final,
               str(generator.get("granularity", "")))


def load_jobs(sweep_dir: Path) -> list[Job]:
    """Every job folder (``0/``, ``1/``, ...) of the sweep, in job order."""
    folders = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return [read_job(p) for p in sorted(folders, key=lambda p: int(p.name))]


def swept_keys(jobs: Sequence[Job]) -> list[str]:
    """Override keys, seed aside, whose values differ between the jobs that recorded overrides,
    in the order the overrides name them."""
    recorded = [job.overrides for job in jobs if job.overrides]
    keys = list(dict.fromkeys(k for overrides in recorded for k in overrides))
    return [k for k in keys if k != "seed" and len({o.get(k) for o in recorded}) > 1]


def columns_of(jobs: Sequence[Job], keys: list[str]) -> list[str]:
    """The table's key columns: the swept keys, then the granularity when it varies between
    the completed jobs without being swept itself (it decides the plots' lines)."""
    varies = len({job.granularity for job in jobs if job.status == "completed"}) > 1
    return [*keys, GRANULARITY] if varies and GRANULARITY not in keys else keys


def _value(job: Job, column: str) -> str | None:
    """The job's value in a key column; the granularity column falls back to the config."""
    if column == GRANULARITY and column not in job.overrides:
        return job.granularity
    return job.overrides.get(column)


def _sort_key(value: str | None) -> tuple[int, float, str]:
    """Numbers in numeric order, then other values, then missing ones."""
    number = _number(value)
    if number is not None:
        return 0, number, ""
    return (1, 0.0, value) if value is not None else (2, 0.0, "")


def _stats(values: list[float]) -> tuple[float, float | None] | None:
    """(mean, sample std) of the values, std None for one value; None for no value."""
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(jobs: Sequence[Job], columns: list[str], metrics: list[str]) -> list[Row]:
    """One row per setting of ``columns`` over the completed jobs, sorted by the columns."""
    groups: dict[tuple[str | None, ...], list[Job]] = {}
    for job in jobs:
        if job.status == "completed":
            groups.setdefault(tuple(_value(job, c) for c in columns), []).append(job)
    rows = []
    for setting in sorted(groups, key=lambda s: [_sort_key(v) for v in s]):
        members = groups[setting]
        rows.append(Row(dict(zip(columns, setting, strict=True)), len(members),
                        {m: _stats([j.final[m] for j in members if m in j.final])
                         for m in metrics}))
    return rows


def metric_names(jobs: Sequence[Job], requested: list[str] | None) -> tuple[list[str], list[str]]:
    """The metrics to report (those requested, else the defaults and every ``gen/*`` key) that
    a completed job reported, and the requested ones that none did."""
    reported = {k for job in jobs if job.status == "completed" for k in job.final}
    wanted = requested or [*DEFAULT_METRICS, *sorted(k for k in reported if k.startswith("gen/"))]
    wanted = list(dict.fromkeys(wanted))
    absent = [m for m in wanted if m not in reported] if requested else []
    return [m for m in wanted if m in reported], absent


def format_stat(stat: tuple[float, float | None] | None) -> str:
    """``mean ± std`` with 4 significant digits, the plain value without a std."""
    if stat is None:
        return MISSING
    mean, std = stat
    return f"{mean:.4g}" if std is None else f"{mean:.4g} ± {std:.4g}"


def markdown_table(rows: list[Row], columns: list[str], metrics: list[str]) -> str:
    """The summary as a Markdown table: the key columns, ``n``, then the metrics."""
    header = [*columns, "n", *metrics]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    body = [line([*(r.setting[c] or MISSING for c in columns), str(r.n),
                  *(format_stat(r.stats[m]) for m in metrics)]) for r in rows]
    return "\n".join([line(header), line(["---"] * len(header)), *body])


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


def write_csv(path: Path, rows: list[Row], columns: list[str], metrics: list[str]) -> None:
    """The summary with a ``METRIC mean`` and a ``METRIC std`` column per metric; empty cells
    for a missing value or the std of a single value."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*columns, "n", *(f"{m} {s}" for m in metrics for s in ("mean", "std"))])
        for row in rows:
            cells: list[object] = [row.setting[c] or "" for c in columns] + [row.n]
            for m in metrics:
                mean, std = row.stats[m] or ("", None)
                cells += [mean, "" if std is None else std]
            writer.writerow(cells)


def _file_name(text: str) -> str:
    """``text`` with every character a file name should not hold replaced by ``_``."""
    return re.sub(r"[^\w.-]", "_", text)


def plot_metric(path: Path, rows: list[Row], columns: list[str], x_key: str,
                metric: str) -> None:
    """``metric`` against the numeric ``x_key``: one line per setting of the other columns,
    error bars (std over seeds) where several seeds ran."""
    others = [c for c in columns if c != x_key]
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        x, stat = _number(row.setting[x_key]), row.stats[metric]
        if x is None or stat is None:
            continue
        label = ", ".join(f"{c}={row.setting[c] or MISSING}" for c in others)
        lines.setdefault(label, []).append((x, stat[0], stat[1] or 0.0))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in lines.items():
        xs, means, stds = zip(*sorted(points), strict=True)
        ax.errorbar(xs, means, yerr=stds if any(stds) else None, marker="o", capsize=3,
                    label=label or None)
    if any(lines):
        ax.legend(fontsize="small")
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {x_key}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(folder: Path, rows: list[Row], columns: list[str], keys: list[str],
                metrics: list[str]) -> list[Path]:
    """A PNG per metric and numeric swept key, in ``folder``."""
    numeric = [k for k in keys
               if all(_number(r.setting[k]) is not None for r in rows if r.setting[k] is not None)
               and any(r.setting[k] is not None for r in rows)]
    if numeric:
        folder.mkdir(exist_ok=True)
    paths = []
    for key in numeric:
        for metric in metrics:
            path = folder / f"{_file_name(metric)}_vs_{_file_name(key)}.png"
            plot_metric(path, rows, columns, key, metric)
            paths.append(path)
    return paths


def markdown(sweep_dir: Path, jobs: Sequence[Job], table: str, failures: list[str],
             plots: list[Path], out: Path) -> str:
    """summary.md: the counts, the table, the jobs that did not complete and the plots."""
    completed = sum(job.status == "completed" for job in jobs)
    parts = [f"# Sweep summary: {sweep_dir}", "",
             f"{len(jobs)} jobs, {completed} completed. Each cell is the mean ± sample std "
             "(ddof=1) over the n seeds of its row, or the value where one job reported it.",
             "", table]
    if failures:
        parts += ["", "## Jobs that did not complete", "", *(f"- {line}" for line in failures)]
    if plots:
        parts += ["", "## Plots", "",
                  *(f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots)]
    return "\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="outputs/<name>/multiruns/<stamp>")
    parser.add_argument("--out", type=Path, help="output folder (default: the sweep folder)")
    parser.add_argument("--metrics", nargs="+", metavar="KEY",
                        help="final metrics to report (default: the key metrics and gen/*)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    sweep_dir: Path = args.sweep_dir
    hint = "pass one multirun folder, such as outputs/<name>/multiruns/<stamp>"
    if not sweep_dir.is_dir():
        raise SystemExit(f"error: {sweep_dir}: not a folder; {hint}")
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise SystemExit(f"error: {sweep_dir}: no job folders (0/, 1/, ...); {hint}")
    if not any(job.status == "completed" for job in jobs):
        raise SystemExit(f"error: {sweep_dir}: none of its {len(jobs)} jobs completed "
                         "(see each job's main.log)")
    metrics, absent = metric_names(jobs, args.metrics)
    if not metrics:
        raise SystemExit(f"error: no completed job reported any of {', '.join(args.metrics)}")
    try:
        out = require_writable_dir(args.out or sweep_dir, "--out")
    except FedA2VError as err:
        raise SystemExit(f"error: {err}") from None

    keys = swept_keys(jobs)
    columns = columns_of(jobs, keys)
    rows = summarize(jobs, columns, metrics)
    failures = failure_lines(jobs, keys)
    table = markdown_table(rows, columns, metrics)
    plots = write_plots(out / "plots", rows, columns, keys, metrics)
    (out / "summary.md").write_text(markdown(sweep_dir, jobs, table, failures, plots, out))
    write_csv(out / "summary.csv", rows, columns, metrics)

    if failures:
        print(f"{len(failures)} of {len(jobs)} jobs did not complete:")
        print("\n".join(f"  {line}" for line in failures))
    if absent:
        print(f"Not reported by any completed job, left out: {', '.join(absent)}")
    print(table)
    print(f"Wrote {out / 'summary.md'}, {out / 'summary.csv'} and {len(plots)} "
          f"plot{'' if len(plots) == 1 else 's'}" + (f" in {out / 'plots'}" if plots else ""))


if __name__ == "__main__":
    main()
