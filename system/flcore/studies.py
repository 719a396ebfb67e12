"""A study (a sweep with seeds as replicates): confidence intervals, paired differences against
a baseline and the convergence measures of an accuracy-per-round curve (pure functions over plain
numbers), then the jobs of a sweep folder grouped into arms and analysed with them.
``scripts/summarize_sweep.py`` is the command line, tables and plots.
"""

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from scipy import stats

from flcore.errors import FedA2VError

LEVEL = 0.95
ACC = "global/acc"
BEST = "best/global/acc"
TO_TARGET = "conv/rounds_to_target"
AUC = "conv/acc_auc"
GRANULARITY = "generator.granularity"
ACCEPTANCE = "synthetic/acceptance_rate"
DEFAULT_METRICS = ("global/acc", "synthetic/acc", ACCEPTANCE, "local/acc_mean",
                   "generator/kl_loss", "generator/recon_loss")


@dataclass(frozen=True)
class Estimate:
    """The mean of ``n`` values, their sample std (ddof=1) and the half-width of the 95% Student
    t interval of the mean; std and half-width are None for a single value."""

    n: int
    mean: float
    std: float | None
    half: float | None

    @property
    def low(self) -> float | None:
        """The interval's lower end."""
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        """The interval's upper end."""
        return None if self.half is None else self.mean + self.half


@dataclass(frozen=True)
class Paired:
    """An arm against its baseline over the seeds both ran: the pair count, the estimate of the
    per-seed difference (arm - baseline; None under 2 pairs) and the paired t-test's two-sided
    p-value (None under 2 pairs or when every difference is the same)."""

    pairs: int
    diff: Estimate | None
    p: float | None

    @property
    def detectable(self) -> bool:
        """Whether the difference's interval excludes 0."""
        return self.diff is not None and self.diff.half is not None and not (
            self.diff.mean - self.diff.half <= 0.0 <= self.diff.mean + self.diff.half)


def t_half_width(std: float, n: int) -> float:
    """Half-width of the 95% interval of a mean: t_{0.975, n-1} * std / sqrt(n)."""
    return float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * std / math.sqrt(n)


def estimate(values: Sequence[float]) -> Estimate | None:
    """Mean, sample std and 95% interval of the values; None for no value."""
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Estimate(len(values), mean, None, None)
    std = statistics.stdev(values)
    return Estimate(len(values), mean, std, t_half_width(std, len(values)))


def paired(arm: Mapping[int, float], baseline: Mapping[int, float]) -> Paired:
    """The arm against the baseline over the seeds both have (same seed = same split and
    initialisation): the differences' estimate and the paired t-test."""
    seeds = sorted(set(arm) & set(baseline))
    if len(seeds) < 2:
        return Paired(len(seeds), None, None)
    a, b = [arm[s] for s in seeds], [baseline[s] for s in seeds]
    diff = estimate([x - y for x, y in zip(a, b, strict=True)])
    p = None if not diff.std else float(stats.ttest_rel(a, b).pvalue)
    return Paired(len(seeds), diff, p)


def rounds_to_target(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first round whose accuracy reaches ``target``; None when none does."""
    return next((r for r, acc in sorted(curve) if acc >= target), None)


def area_under_curve(curve: Sequence[tuple[int, float]], rounds: int) -> float | None:
    """The mean accuracy over the evaluated rounds 1..``rounds`` (in [0, 1] for accuracies and
    comparable across round counts); None when none of them was evaluated."""
    inside = [acc for r, acc in curve if 1 <= r <= rounds]
    return statistics.fmean(inside) if inside else None


def format_interval(mean: float, half: float | None) -> str:
    """``mean ± half`` with the half-width to two significant figures and the mean to the same
    decimal place; the mean to 4 significant figures without a half-width."""
    if half is None:
        return f"{mean:.4g}"
    if half == 0:
        return f"{mean:.4g} ± 0"
    places = decimals(half)
    return f"{round(mean, places):.{max(places, 0)}f} ± {round(half, places):.{max(places, 0)}f}"


def decimals(half: float) -> int:
    """The decimal place that rounds ``half`` to two significant figures (negative above 99)."""
    rounded = float(f"{abs(half):.2g}")
    return 1 - math.floor(math.log10(rounded))


# The jobs of a sweep folder, grouped into arms.


@dataclass
class Job:
    """One job folder: its status, overrides as ``{key: value}``, what it reported and its
    rounds (one dict per logged round)."""

    name: str
    status: str
    overrides: dict[str, str]
    error: str = ""
    final: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    granularity: str = ""
    seed: int | None = None
    chance: float | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)

    @property
    def last_round(self) -> int:
        """The last round it logged (0 without rounds)."""
        return max((int(r["round"]) for r in self.rounds if "round" in r), default=0)


@dataclass
class Arm:
    """One setting of the key columns, its jobs, each job's metric values, the rounds-to-target
    accuracy, each metric's estimate, (reached, jobs with a curve), the jobs that never reached
    the target and, against a baseline, each metric's paired comparison."""

    setting: dict[str, str | None]
    jobs: list[Job]
    values: list[dict[str, float]] = field(default_factory=list)
    target: float | None = None
    estimates: dict[str, Estimate | None] = field(default_factory=dict)
    reached: tuple[int, int] = (0, 0)
    missed: set[str] = field(default_factory=set)
    versus: dict[str, Paired] | None = None

    def by_seed(self, metric: str) -> dict[int, float]:
        """The metric's value per seed."""
        return {j.seed: v[metric] for j, v in zip(self.jobs, self.values, strict=True)
                if metric in v and j.seed is not None}


def parse_override(text: str) -> tuple[str, str]:
    """``key=value``, ``+key=value``, ``++key=value`` or ``~key`` as ``(key, value)``."""
    key, _, value = text.lstrip("+~").partition("=")
    return key, value


def number(text: object) -> float | None:
    """The value as a finite float, or None when it is not a number."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _numbers(record: dict) -> dict[str, float]:
    """The record's finite numeric values (booleans left out)."""
    return {k: float(v) for k, v in record.items() if not isinstance(v, bool)
            and number(v) is not None}


def _hydra_overrides(folder: Path) -> dict[str, str]:
    """The overrides Hydra recorded in ``.hydra/overrides.yaml``; empty when there are none."""
    try:
        listed = OmegaConf.load(folder / ".hydra" / "overrides.yaml")
    except (OSError, ValueError):
        return {}
    return dict(parse_override(str(o)) for o in listed) if OmegaConf.is_list(listed) else {}


def _csv_rounds(path: Path) -> list[dict[str, float]]:
    """The rows of a job's metrics.csv; empty when it has none."""
    try:
        with path.open(newline="") as handle:
            return [_numbers(row) for row in csv.DictReader(handle)]
    except OSError:
        return []


def read_job(folder: Path) -> Job:
    """The job in ``folder``; status ``unreadable`` when its results.json cannot be read."""
    try:
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        results = None
    if not isinstance(results, dict):
        return Job(folder.name, "unreadable", _hydra_overrides(folder), "no readable results.json")
    config = results.get("config") or {}
    overrides = dict(parse_override(o) for o in results.get("environment", {}).get("overrides", []))
    final = _numbers(results.get("final") or {})
    seed = number(config.get("seed", overrides.get("seed")))
    classes = final.get("partition/num_classes")
    federation_space = (config.get("eval") or {}).get("label_space", "federation") == "federation"
    rounds = results.get("rounds")
    return Job(folder.name, str(results.get("status", "unknown")), overrides,
               " ".join(str(results.get("error") or "").split()), final,
               _numbers(results.get("best") or {}),
               str((config.get("generator") or {}).get("granularity", "")),
               None if seed is None else int(seed),
               1 / classes if classes and federation_space else None,
               [_numbers(r) for r in rounds] if isinstance(rounds, list)
               else _csv_rounds(folder / "metrics.csv"))


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
    """The key columns: the swept keys, then the granularity when it varies between the
    completed jobs without being swept itself."""
    varies = len({job.granularity for job in jobs if job.status == "completed"}) > 1
    return [*keys, GRANULARITY] if varies and GRANULARITY not in keys else keys


def _value(job: Job, column: str) -> str | None:
    """The job's value in a key column; the granularity column falls back to the config."""
    if column == GRANULARITY and column not in job.overrides:
        return job.granularity
    return job.overrides.get(column)


def _sort_key(value: str | None) -> tuple[int, float, str]:
    """Numbers in numeric order, then other values, then missing ones."""
    as_number = number(value)
    if as_number is not None:
        return 0, as_number, ""
    return (1, 0.0, value) if value is not None else (2, 0.0, "")


def group_arms(jobs: Sequence[Job], columns: list[str]) -> list[Arm]:
    """One arm per setting of ``columns`` over the completed jobs, sorted by the columns."""
    groups: dict[tuple[str | None, ...], list[Job]] = {}
    for job in jobs:
        if job.status == "completed":
            groups.setdefault(tuple(_value(job, c) for c in columns), []).append(job)
    arms = []
    for setting in sorted(groups, key=lambda s: [_sort_key(v) for v in s]):
        seeds = [j.seed for j in groups[setting]]
        twice = next((s for s in seeds if seeds.count(s) > 1), None)
        if twice is not None:
            jobs_named = ", ".join(j.name for j in groups[setting] if j.seed == twice)
            raise FedA2VError(f"jobs {jobs_named} share seed {twice} and every swept "
                             "value: seeds must be distinct replicates")
        arms.append(Arm(dict(zip(columns, setting, strict=True)), groups[setting]))
    return arms


def layout(arms: list[Arm], columns: list[str]) -> tuple[list[str], dict[str, str]]:
    """The columns to show and, for each column left out because another shown column
    determines its values, that column."""
    shown: list[str] = []
    follows: dict[str, str] = {}
    for column in columns:
        if len({a.setting[column] for a in arms}) == 1:
            continue
        leader = next((k for k in shown if len({(a.setting[k], a.setting[column])
                                                  for a in arms}) == len({a.setting[k]
                                                                         for a in arms})), None)
        if leader is None:
            shown.append(column)
        else:
            follows[column] = leader
    return shown, follows


def common_settings(jobs: Sequence[Job], arms: list[Arm], columns: list[str]) -> list[str]:
    """``key=value`` for every override and key column with one value in every completed job."""
    done = [j for j in jobs if j.status == "completed"]
    same = [f"{k}={v}" for k, v in done[0].overrides.items() if k != "seed" and k not in columns
            and all(j.overrides.get(k) == v for j in done)]
    return same + [f"{c}={arms[0].setting[c]}" for c in columns
                   if len({a.setting[c] for a in arms}) == 1]


def values_at(job: Job, rounds: int, equal: bool) -> dict[str, float]:
    """The job's metrics at round ``rounds``: its ``final`` and ``best`` blocks when every job
    ran that many rounds, else the last value of each key up to that round and the test
    accuracy of the round with the best ``val/acc`` up to it; and its accuracy-curve AUC."""
    upto = sorted((r for r in job.rounds if r.get("round", math.inf) <= rounds),
                  key=lambda r: r["round"])
    if equal:
        values, best = dict(job.final), job.best
    else:
        values = {k: v for r in upto for k, v in r.items() if k != "round"}
        scored = [r for r in upto if "val/acc" in r and ACC in r]
        best = max(scored, key=lambda r: r["val/acc"], default={})
    if ACC in best:
        values[BEST] = best[ACC]
    auc = area_under_curve(curve(job, ACC, rounds), rounds)
    if auc is not None:
        values[AUC] = auc
    return values


def curve(job: Job, metric: str, rounds: int) -> list[tuple[int, float]]:
    """(round, value) of every round from 1 to ``rounds`` that logged ``metric``."""
    return sorted((int(r["round"]), r[metric]) for r in job.rounds
                  if metric in r and 1 <= r.get("round", 0) <= rounds)


def _same(value: str | None, wanted: str) -> bool:
    """Whether a key column's value is ``wanted``, numerically where both are numbers."""
    a, b = number(value), number(wanted)
    return value == wanted or (a is not None and a == b)


def parse_baseline(specs: list[str], arms: list[Arm], columns: list[str]) -> dict[str, str]:
    """``--baseline key=value`` as ``{key: value}``; an ``error:`` exit for a key that is not
    a key column, a value no completed job has, or a baseline every arm matches."""
    wanted: dict[str, str] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise FedA2VError(f"--baseline {spec}: expected KEY=VALUE")
        if key not in columns:
            raise FedA2VError(f"--baseline {spec}: {key} is not a swept key; swept keys: "
                             f"{', '.join(columns) or 'none'}")
        present = sorted({str(a.setting[key]) for a in arms}, key=_sort_key)
        if not any(_same(a.setting[key], value) for a in arms):
            raise FedA2VError(f"--baseline {spec}: no completed job has {key}={value}; "
                             f"values present: {', '.join(present)}")
        wanted[key] = value
    if all(is_baseline(a, wanted) for a in arms):
        raise FedA2VError(f"--baseline {' '.join(specs)}: every arm matches it, so there "
                         "is nothing to compare with it")
    return wanted


def is_baseline(arm: Arm, baseline: dict[str, str]) -> bool:
    """Whether the arm has every baseline value."""
    return all(_same(arm.setting[k], v) for k, v in baseline.items())


def counterpart(arm: Arm, arms: list[Arm], baseline: dict[str, str]) -> Arm | None:
    """The baseline arm that agrees with ``arm`` on every other key column that varies between
    baseline arms; None when there is none."""
    bases = [a for a in arms if is_baseline(a, baseline)]
    varying = [c for c in arm.setting if c not in baseline
               and len({b.setting[c] for b in bases}) > 1]
    return next((b for b in bases if all(b.setting[c] == arm.setting[c] for c in varying)), None)


def analyse(arms: list[Arm], final_metrics: list[str], rounds: int, equal: bool,
            baseline: dict[str, str] | None, target: float) -> list[str]:
    """Fill each arm's values, target, estimates and (with a baseline) paired differences;
    the metrics with the derived ones."""
    for arm in arms:
        arm.values = [values_at(job, rounds, equal) for job in arm.jobs]
    references = {id(a): (counterpart(a, arms, baseline) if baseline else a) for a in arms}
    for arm in arms:
        reference = references[id(arm)]
        finals = [v[ACC] for v in reference.values if ACC in v] if reference else []
        arm.target = target * sum(finals) / len(finals) if finals else None
        if arm.target is not None:
            curves = [(j, curve(j, ACC, rounds)) for j in arm.jobs]
            hits = {j.name: rounds_to_target(c, arm.target) for j, c in curves if c}
            for job, values in zip(arm.jobs, arm.values, strict=True):
                if hits.get(job.name) is not None:
                    values[TO_TARGET] = hits[job.name]
            arm.missed = {name for name, hit in hits.items() if hit is None}
            arm.reached = (len(hits) - len(arm.missed), len(hits))
    metrics = with_derived(final_metrics, arms)
    for arm in arms:
        arm.estimates = {m: estimate([v[m] for v in arm.values if m in v]) for m in metrics}
    if baseline:
        for arm in arms:
            base = references[id(arm)]
            if base is not None and base is not arm:
                arm.versus = {m: paired(arm.by_seed(m), base.by_seed(m)) for m in metrics}
    return metrics


def metric_names(jobs: Sequence[Job], requested: list[str] | None) -> tuple[list[str], list[str]]:
    """The final metrics to report (those requested, else the defaults and every ``gen/*`` key)
    that a completed job reported, and the requested ones that none did."""
    reported = {k for job in jobs if job.status == "completed" for k in job.final}
    wanted = requested or [*DEFAULT_METRICS, *sorted(k for k in reported if k.startswith("gen/"))]
    wanted = list(dict.fromkeys(wanted))
    absent = [m for m in wanted if m not in reported] if requested else []
    return [m for m in wanted if m in reported], absent


def with_derived(metrics: list[str], arms: list[Arm]) -> list[str]:
    """The metrics with best-val accuracy, rounds to target and AUC where any job has them."""
    present = {k for arm in arms for v in arm.values for k in v}
    return [*metrics, *(m for m in (BEST, TO_TARGET, AUC) if m in present and m not in metrics)]
