"""Quality of generated embeddings against real ones, per class and pooled: the report that
assembles the metrics of :mod:`~flcore.metrics.distribution` (distribution distances, manifold
metrics, 1-NN accuracy, diversity) and :mod:`~flcore.metrics.memorization` (memorization, the
latent usage of a VAE), and the entry points for any two sets of rows.

Rows are flattened embeddings: real ``[n, d]``, generated ``[m, d]``; all arithmetic is float64.
A metric without a value for its inputs (too few rows for a covariance or a k-th neighbour, zero
spread) raises :class:`UndefinedMetric` with the reason; :func:`generator_report` records that as
``None`` plus the reason, so a small class never crashes a round nor gets an invented number.
NaN or infinite rows raise :class:`NonFiniteRows` (a ValueError), which a run reports as a
TrainingError.
"""

from collections.abc import Callable, Collection, Mapping, Sequence
from functools import cache
from typing import NamedTuple, TypedDict

import torch
from torch import Tensor

from flcore.metrics.distribution import (
    MMD,
    PairwiseDistances,
    coverage,
    density,
    frechet_distance,
    mean_cosine_similarity,
    mean_l2_distance,
    mean_pairwise_distance,
    mmd2,
    one_nn_accuracy,
    pairwise_distances,
    precision,
    recall,
    spread_ratio,
)
from flcore.metrics.memorization import (
    TrainingDistances,
    active_units,
    dcr_ratio,
    kl_per_dimension,
    near_copy_share,
    training_distances,
)
from flcore.metrics.rows import NonFiniteRows, UndefinedMetric, as_rows, check_finite, require

__all__ = [
    "MMD",
    "QUALITY_METRICS",
    "NonFiniteRows",
    "PairwiseDistances",
    "Report",
    "Scores",
    "TrainingDistances",
    "Undefined",
    "UndefinedMetric",
    "active_units",
    "coverage",
    "dcr_ratio",
    "density",
    "evaluate_diversity",
    "evaluate_quality",
    "frechet_distance",
    "generator_report",
    "kl_per_dimension",
    "latent_usage",
    "mean_cosine_similarity",
    "mean_l2_distance",
    "mean_pairwise_distance",
    "mmd2",
    "near_copy_share",
    "one_nn_accuracy",
    "pairwise_distances",
    "precision",
    "recall",
    "spread_ratio",
    "training_distances",
]


class Scores(NamedTuple):
    """Metric values (None where undefined) and the reason for each undefined one."""

    values: dict[str, float | None]
    undefined: dict[str, str]


def _score(metrics: Mapping[str, Callable[[], float | None]]) -> Scores:
    values: dict[str, float | None] = {}
    undefined: dict[str, str] = {}
    for name, compute in metrics.items():
        try:
            values[name] = compute()
        except UndefinedMetric as reason:
            values[name] = None
            undefined[name] = str(reason)
    return Scores(values, undefined)


def latent_usage(mu: Tensor, logvar: Tensor, *, where: str, threshold: float = 0.01) -> Scores:
    """``active_units`` and ``kl`` (total: the sum over dimensions of :func:`kl_per_dimension`)
    of one generator's posterior means and log-variances ``[n, z]`` (``VAEGenerator.encode``).
    Raises :class:`NonFiniteRows`, naming ``where``, on NaN or infinite values."""
    check_finite(mu, f"{where}: posterior means")
    check_finite(logvar, f"{where}: posterior log-variances")
    return _score({"active_units": lambda: active_units(mu, threshold),
                   "kl": lambda: float(kl_per_dimension(mu, logvar).sum())})


# Everything, per class and pooled


class Undefined(TypedDict):
    """Why each undefined metric has no value: ``{class: {metric: reason}}`` and pooled."""

    per_class: dict[str, dict[str, str]]
    pooled: dict[str, str]


class Report(TypedDict):
    """Metric values (None where undefined) per class and pooled, and the reasons."""

    per_class: dict[str, dict[str, float | None]]
    pooled: dict[str, float | None]
    undefined: Undefined


def _subsample(parts: list[Tensor], max_rows: int, rng: torch.Generator) -> Tensor:
    """The rows of ``parts`` stacked, or a uniform random ``max_rows`` of them if there are
    more."""
    parts = [p.flatten(1) for p in parts]
    total = sum(len(p) for p in parts)
    if total <= max_rows:
        return torch.cat(parts)
    keep = torch.randperm(total, generator=rng)[:max_rows].sort().values
    chosen, start = [], 0
    for p in parts:
        mine = keep[(keep >= start) & (keep < start + len(p))] - start
        chosen.append(p[mine.to(p.device)])
        start += len(p)
    return torch.cat(chosen)


def _given(distances: TrainingDistances | None) -> TrainingDistances:
    require(distances is not None, "no training rows given (train_by_class=None)")
    return distances


def _scores(real: Tensor, generated: Tensor, train: Tensor | None, *, count: int, k: int,
            permutations: int, rng: torch.Generator,
            names: Collection[str] | None = None) -> Scores:
    """Every metric (or those in ``names``) of one class, or of the pool, on rows already
    subsampled; ``count`` is the number of generated rows before subsampling."""
    real, generated = as_rows(real), as_rows(generated)
    pair = pairwise_distances(real, generated)
    near = None if train is None else training_distances(generated, train, real)
    mmd = cache(lambda: mmd2(pair, permutations, rng))  # one test for the value and p-value
    metrics: dict[str, Callable[[], float | None]] = {
        "count": lambda: count,
        "fd": lambda: frechet_distance(real, generated),
        "mmd": lambda: mmd().value,
    }
    if permutations > 0:
        metrics["mmd_pvalue"] = lambda: mmd().p_value
    metrics |= {
        "precision": lambda: precision(pair, k),
        "recall": lambda: recall(pair, k),
        "density": lambda: density(pair, k),
        "coverage": lambda: coverage(pair, k),
        "one_nn_acc": lambda: one_nn_accuracy(pair),
        "dcr_ratio": lambda: dcr_ratio(_given(near)),
        "near_copy_share": lambda: near_copy_share(_given(near)),
        "spread_ratio": lambda: spread_ratio(real, generated),
        "pairwise_distance": lambda: mean_pairwise_distance(pair),
        "l2_distance": lambda: mean_l2_distance(real, generated),
        "cosine_similarity": lambda: mean_cosine_similarity(real, generated),
    }
    return _score({k: v for k, v in metrics.items() if names is None or k in names})


QUALITY_METRICS = ("count", "fd", "mmd", "mmd_pvalue", "precision", "recall", "density",
                   "coverage", "one_nn_acc", "dcr_ratio", "near_copy_share", "spread_ratio",
                   "pairwise_distance", "l2_distance", "cosine_similarity")


def evaluate_quality(real: Tensor, generated: Tensor, metrics: Sequence[str] | None = None, *,
                     train: Tensor | None = None, k: int = 5, permutations: int = 0,
                     seed: int = 0) -> dict[str, float | None]:
    """The named metrics (all by default) of one set of generated rows against real rows; None
    where undefined (see :func:`generator_report` for the reasons). Raises ValueError naming
    unknown metrics."""
    unknown = sorted(set(metrics or ()) - set(QUALITY_METRICS))
    if unknown:
        raise ValueError(f"unknown generator metric(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(QUALITY_METRICS)}")
    check_finite(as_rows(generated), "generated samples")
    rng = torch.Generator().manual_seed(seed)
    return _scores(real, generated, train, count=len(generated), k=k, permutations=permutations,
                   rng=rng, names=metrics).values


def evaluate_diversity(generated: Tensor) -> dict[str, float]:
    """Mean per-dimension standard deviation (``std``) and mean pairwise distance of generated
    rows: their diversity, without real rows to compare with."""
    rows = as_rows(generated)
    require(len(rows) >= 2, f"needs 2 or more generated rows, got {len(rows)}")
    return {"std": float(rows.std(0).mean()),
            "pairwise_distance": mean_pairwise_distance(pairwise_distances(rows[:1], rows))}


def generator_report(real_by_class: Mapping[str, Tensor],
                     generated_by_class: Mapping[str, Tensor],
                     train_by_class: Mapping[str, Tensor] | None = None, *, where: str,
                     k: int = 5, permutations: int = 0, max_rows: int = 1000,
                     seed: int = 0) -> Report:
    """Every real-vs-generated metric per class and pooled, with the reason for each undefined
    one. ``real_by_class`` are held-out real rows, ``train_by_class`` the generator's training
    rows (for the DCR ratio and near-copies).

    Pooled metrics are computed on the union of all classes' rows, not as a mean of per-class
    values. Real and generated sets larger than ``max_rows`` (per class, and the pool) are a
    uniform random ``max_rows`` of their rows (``seed``), bounding the cost; ``count`` is the
    full number of generated rows, and training rows are never subsampled. Raises
    :class:`NonFiniteRows`, naming ``where`` and the class, if generated rows contain NaN or
    infinite values."""
    classes = list(dict.fromkeys([*real_by_class, *generated_by_class]))
    if not classes:
        raise ValueError("generator_report needs at least one class")
    for name, rows in generated_by_class.items():
        check_finite(rows, f"{where}, class {name}: generated samples")
    like = next(iter({**real_by_class, **generated_by_class}.values())).flatten(1)

    def rows_of(by_class: Mapping[str, Tensor], name: str) -> Tensor:
        return by_class[name].flatten(1) if name in by_class else like[:0]

    rng = torch.Generator().manual_seed(seed)
    report: Report = {"per_class": {}, "pooled": {},
                      "undefined": {"per_class": {}, "pooled": {}}}
    for name in classes:
        generated = rows_of(generated_by_class, name)
        train = None if train_by_class is None else rows_of(train_by_class, name)
        scores = _scores(_subsample([rows_of(real_by_class, name)], max_rows, rng),
                         _subsample([generated], max_rows, rng), train, count=len(generated),
                         k=k, permutations=permutations, rng=rng)
        report["per_class"][name] = scores.values
        if scores.undefined:
            report["undefined"]["per_class"][name] = scores.undefined
    train = None if train_by_class is None else torch.cat(
        [rows_of(train_by_class, name) for name in classes])
    pooled = _scores(_subsample([rows_of(real_by_class, c) for c in classes], max_rows, rng),
                     _subsample([rows_of(generated_by_class, c) for c in classes], max_rows, rng),
                     train, count=sum(len(rows_of(generated_by_class, c)) for c in classes),
                     k=k, permutations=permutations, rng=rng)
    report["pooled"] = pooled.values
    report["undefined"]["pooled"] = pooled.undefined
    return report
