"""Quality of generated embeddings against real ones: distribution distances (Fréchet, MMD²),
manifold metrics (precision, recall, density, coverage), 1-NN two-sample accuracy, memorization
(DCR ratio, near-copies), diversity, and the latent usage of a VAE (active units, KL).

Rows are flattened embeddings: real ``[n, d]``, generated ``[m, d]``; all arithmetic is float64.
A metric without a value for its inputs (too few rows for a covariance or a k-th neighbour, zero
spread) raises :class:`UndefinedMetric` with the reason; :func:`generator_report` records that as
``None`` plus the reason, so a small class never crashes a round nor gets an invented number.
"""

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple, TypedDict

import torch
from torch import Tensor

from flcore.errors import TrainingError

_PERMUTATION_CHUNK = 256  # labellings per matmul in the MMD² test: memory N x 256


class UndefinedMetric(ValueError):
    """A metric has no value for these inputs (too few rows, zero spread); the message says why."""


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise UndefinedMetric(reason)


def _need(count: int, minimum: int, what: str) -> None:
    _require(count >= minimum, f"needs {minimum} or more {what}, got {count}")


def _need_neighbours(count: int, k: int, what: str) -> None:
    """A k-th nearest neighbour within a set needs k + 1 rows."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    _need(count, k + 1, f"{what} rows (k + 1, k={k})")


def _rows(x: Tensor) -> Tensor:
    """``x`` as float64 rows ``[n, d]`` (trailing axes flattened)."""
    return x.detach().double().flatten(1)


def _euclidean(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances ``[len(a), len(b)]`` through the Gram matrix; callers centre the rows
    first, which keeps ``‖a‖² + ‖b‖² − 2ab`` precise."""
    squared = a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T
    return squared.clamp_min(0).sqrt()


# Fréchet distance


def _covariance_factor(x: Tensor) -> Tensor:
    """A ``[min(n, d), d]`` matrix F with FᵀF the unbiased covariance of the rows ``x``."""
    a = (x - x.mean(0)) / math.sqrt(len(x) - 1)
    return torch.linalg.qr(a, mode="r").R if a.shape[0] > a.shape[1] else a


def frechet_distance(real: Tensor, generated: Tensor) -> float:
    """Fréchet distance of Gaussians fitted to the rows (Dowson & Landau 1982; FID, Heusel et al.
    2017): ‖μ₁−μ₂‖² + tr C₁ + tr C₂ − 2 tr √(C₁C₂), with unbiased (n − 1) covariances.

    With C₁ = AᵀA and C₂ = BᵀB, the eigenvalues of C₁C₂ are the squared singular values of ABᵀ,
    so tr √(C₁C₂) is the nuclear norm of ABᵀ, a small ``[min(n, d), min(m, d)]`` matrix (a set
    with more rows than d is first reduced to its QR factor R, RᵀR = AᵀA): exact and stable when
    rows < dimensions, with no d × d matrix square root."""
    x, y = _rows(real), _rows(generated)
    _need(len(x), 2, "real rows")
    _need(len(y), 2, "generated rows")
    a, b = _covariance_factor(x), _covariance_factor(y)
    trace_sqrt = torch.linalg.svdvals(a @ b.T).sum()
    means = (x.mean(0) - y.mean(0)).square().sum()
    return float(means + a.square().sum() + b.square().sum() - 2 * trace_sqrt)


# Metrics on the pairwise distances of real ∪ generated


@dataclass(frozen=True)
class PairwiseDistances:
    """Euclidean distances ``[n + m, n + m]`` (float64, zero diagonal) among the real rows (the
    first ``n``) and the generated rows; built once by :func:`pairwise_distances`."""

    union: Tensor
    n: int

    @property
    def m(self) -> int:
        return self.union.shape[0] - self.n

    @property
    def real(self) -> Tensor:
        return self.union[: self.n, : self.n]

    @property
    def generated(self) -> Tensor:
        return self.union[self.n :, self.n :]

    @property
    def cross(self) -> Tensor:
        """Real rows by generated rows, ``[n, m]``."""
        return self.union[: self.n, self.n :]


def pairwise_distances(real: Tensor, generated: Tensor) -> PairwiseDistances:
    """The distances that MMD², precision/recall/density/coverage, 1-NN accuracy and the mean
    pairwise distance share, computed once."""
    z = torch.cat([_rows(real), _rows(generated)])
    z = z - z.mean(0)
    return PairwiseDistances(_euclidean(z, z).fill_diagonal_(0), len(real))


def _kth_neighbour(within: Tensor, k: int) -> Tensor:
    """Distance of each row of a set to its k-th nearest other row of that set."""
    return within.clone().fill_diagonal_(math.inf).kthvalue(k, dim=1).values


def precision(distances: PairwiseDistances, k: int = 5) -> float:
    """Share of generated rows inside the k-NN ball of at least one real row (Kynkäänniemi et al.
    2019, as computed by Naeem et al. 2020): fidelity."""
    _need_neighbours(distances.n, k, "real")
    _need(distances.m, 1, "generated rows")
    inside = distances.cross < _kth_neighbour(distances.real, k)[:, None]
    return float(inside.any(0).double().mean())


def recall(distances: PairwiseDistances, k: int = 5) -> float:
    """Share of real rows inside the k-NN ball of at least one generated row (Kynkäänniemi et al.
    2019, as computed by Naeem et al. 2020): how much of the real data is reached."""
    _need_neighbours(distances.m, k, "generated")
    _need(distances.n, 1, "real rows")
    inside = distances.cross < _kth_neighbour(distances.generated, k)[None, :]
    return float(inside.any(1).double().mean())


def density(distances: PairwiseDistances, k: int = 5) -> float:
    """Mean over generated rows of the number of real k-NN balls containing them, divided by k
    (Naeem et al. 2020): about 1 for matching distributions, unbounded above."""
    _need_neighbours(distances.n, k, "real")
    _need(distances.m, 1, "generated rows")
    inside = distances.cross < _kth_neighbour(distances.real, k)[:, None]
    return float(inside.sum(0).double().mean() / k)


def coverage(distances: PairwiseDistances, k: int = 5) -> float:
    """Share of real rows whose k-NN ball contains at least one generated row (Naeem et al.
    2020): mode coverage, robust to generated outliers."""
    _need_neighbours(distances.n, k, "real")
    _need(distances.m, 1, "generated rows")
    nearest = distances.cross.min(1).values
    return float((nearest < _kth_neighbour(distances.real, k)).double().mean())


def one_nn_accuracy(distances: PairwiseDistances) -> float:
    """Leave-one-out 1-NN two-sample accuracy over real ∪ generated (Lopez-Paz & Oquab 2017; Xu
    et al. 2018), balanced: the mean of the real rows' and the generated rows' accuracies, so that
    chance stays ≈ 0.5 when m ≠ n (with m = n it is the plain accuracy). 0.5: indistinguishable,
    1.0: separable, below 0.5: generated rows sit on top of real ones."""
    _need(distances.n, 1, "real rows")
    _need(distances.m, 1, "generated rows")
    nearest = distances.union.clone().fill_diagonal_(math.inf).argmin(1)
    is_real = torch.arange(len(nearest), device=nearest.device) < distances.n
    correct = (is_real[nearest] == is_real).double()
    return float((correct[: distances.n].mean() + correct[distances.n :].mean()) / 2)


def mean_pairwise_distance(distances: PairwiseDistances) -> float:
    """Mean Euclidean distance between distinct generated rows: diversity (0 = collapse)."""
    m = distances.m
    _need(m, 2, "generated rows")
    return float(distances.generated.sum() / (m * (m - 1)))


class MMD(NamedTuple):
    """Unbiased MMD², its permutation p-value (None without permutations), the RBF bandwidth σ."""

    value: float
    p_value: float | None
    bandwidth: float


def _mmd2_labelled(kernel: Tensor, labels: Tensor, n: int) -> Tensor:
    """Unbiased MMD² for each labelling, a column of ``labels`` ``[N, P]`` (1 marks the ``n``
    rows of the first set); ``kernel`` ``[N, N]`` has a zero diagonal."""
    m = kernel.shape[0] - n
    weighted = kernel @ labels
    within_x = (labels * weighted).sum(0)
    between = (labels * (kernel.sum(1, keepdim=True) - weighted)).sum(0)
    within_y = kernel.sum() - within_x - 2 * between
    return within_x / (n * (n - 1)) + within_y / (m * (m - 1)) - 2 * between / (n * m)


def mmd2(distances: PairwiseDistances, permutations: int = 0,
         generator: torch.Generator | None = None) -> MMD:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3) with the RBF kernel exp(−‖x − y‖² / 2σ²), σ by
    the median heuristic: the median (the lower middle value for an even count, as
    ``torch.median``) of the Euclidean distances of all distinct pairs of rows of real ∪ generated.

    With ``permutations`` > 0, also the permutation-test p-value: the union relabelled at random
    (``generator``) that many times, p = (1 + #{permuted MMD² ≥ observed}) / (1 + permutations),
    never 0 (Phipson & Smyth 2010)."""
    n, m = distances.n, distances.m
    _need(n, 2, "real rows")
    _need(m, 2, "generated rows")
    pairs = torch.ones_like(distances.union, dtype=torch.bool).triu(1)
    sigma = float(distances.union[pairs].median())
    _require(sigma > 0, "the median pairwise distance is 0 (most rows coincide)")
    kernel = torch.exp(-distances.union.square() / (2 * sigma**2)).fill_diagonal_(0)
    labels = (torch.arange(n + m, device=kernel.device) < n).double()[:, None]
    observed = _mmd2_labelled(kernel, labels, n)[0]
    if permutations <= 0:
        return MMD(float(observed), None, sigma)
    exceed = 0
    for start in range(0, permutations, _PERMUTATION_CHUNK):
        size = min(_PERMUTATION_CHUNK, permutations - start)
        order = torch.rand(size, n + m, generator=generator).argsort(1)
        shuffled = (order < n).double().T.to(kernel.device)
        exceed += int((_mmd2_labelled(kernel, shuffled, n) >= observed).sum())
    return MMD(float(observed), (1 + exceed) / (1 + permutations), sigma)


# Diversity and class means


def spread_ratio(real: Tensor, generated: Tensor) -> float:
    """Mean per-dimension standard deviation (n − 1) of the generated rows over that of the real
    rows: 1.0 = the same spread, below 1 = too narrow (posterior collapse), above 1 = too wide."""
    x, y = _rows(real), _rows(generated)
    _need(len(x), 2, "real rows")
    _need(len(y), 2, "generated rows")
    real_spread = x.std(0).mean()
    _require(bool(real_spread > 0), "the real rows have zero spread")
    return float(y.std(0).mean() / real_spread)


def mean_l2_distance(real: Tensor, generated: Tensor) -> float:
    """‖mean(real) − mean(generated)‖₂: the upstream ``l2_distance``, between class means."""
    x, y = _rows(real), _rows(generated)
    _need(len(x), 1, "real rows")
    _need(len(y), 1, "generated rows")
    return float((x.mean(0) - y.mean(0)).norm())


def mean_cosine_similarity(real: Tensor, generated: Tensor) -> float:
    """Cosine similarity of mean(real) and mean(generated): the upstream ``cosine_similarity``,
    between class means."""
    x, y = _rows(real), _rows(generated)
    _need(len(x), 1, "real rows")
    _need(len(y), 1, "generated rows")
    a, b = x.mean(0), y.mean(0)
    norms = a.norm() * b.norm()
    _require(bool(norms > 0), "a class mean is the zero vector")
    return float(a @ b / norms)


# Memorization


@dataclass(frozen=True)
class TrainingDistances:
    """Distances to the nearest training rows, ascending: of each generated row to its two
    nearest ``[m, min(2, t)]`` and of each held-out real row to its nearest ``[n, min(1, t)]``;
    built once by :func:`training_distances`."""

    generated: Tensor
    held_out: Tensor
    train_rows: int


def _nearest_training(rows: Tensor, train: Tensor, count: int) -> Tensor:
    """Distances ``[len(rows), min(count, len(train))]`` to the nearest training rows, ascending."""
    shift = train.mean(0) if len(train) else 0
    distances = _euclidean(rows - shift, train - shift)
    return distances.topk(min(count, len(train)), dim=1, largest=False).values


def training_distances(generated: Tensor, train: Tensor, held_out: Tensor) -> TrainingDistances:
    """What the DCR ratio and the near-copy share need, for generated and held-out real rows
    against the generator's training rows."""
    g, t, h = _rows(generated), _rows(train), _rows(held_out)
    return TrainingDistances(_nearest_training(g, t, 2), _nearest_training(h, t, 1), len(t))


def dcr_ratio(distances: TrainingDistances) -> float:
    """Median distance to the closest training row (DCR) of the generated rows over that of
    held-out real rows, which the generator never saw (Platzer & Reutterer 2021). Below 1: the
    generated rows are closer to the training data than fresh real data is (memorization); ≈ 1:
    no closer. Medians are ``torch.median`` (lower middle value for an even count)."""
    _need(distances.train_rows, 1, "training rows")
    _need(len(distances.generated), 1, "generated rows")
    _need(len(distances.held_out), 1, "held-out real rows")
    fresh = distances.held_out[:, 0].median()
    _require(bool(fresh > 0), "the held-out rows' median distance to the training rows is 0 "
                              "(they are training rows)")
    return float(distances.generated[:, 0].median() / fresh)


def near_copy_share(distances: TrainingDistances, ratio: float = 1 / 3) -> float:
    """Share of generated rows that copy one training row: distance to the nearest training row
    below ``ratio`` × that to the second nearest, or exactly 0 (the 1/3 rule of Yoon et al. 2023
    and Gu et al. 2023). Scale-free; meant for high-dimensional rows, where fresh samples have
    nearest/second-nearest ratios near 1."""
    _need(distances.train_rows, 2, "training rows")
    _need(len(distances.generated), 1, "generated rows")
    nearest = distances.generated
    copies = (nearest[:, 0] < ratio * nearest[:, 1]) | (nearest[:, 0] == 0)
    return float(copies.double().mean())


# Latent usage of a VAE


def kl_per_dimension(mu: Tensor, logvar: Tensor) -> Tensor:
    """``[z]``: mean over rows of KL(N(μ, σ²) ‖ N(0, 1)) in each latent dimension, closed form
    (Kingma & Welling 2014); near 0 in a dimension the decoder ignores."""
    _need(len(mu), 1, "posterior rows")
    mu, logvar = mu.detach().double(), logvar.detach().double()
    return (0.5 * (mu.square() + logvar.exp() - 1 - logvar)).mean(0)


def active_units(mu: Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies over the data: Var_x(E_q[z | x]) > threshold
    (Burda et al. 2016), unbiased (n − 1) variance of ``mu`` ``[n, z]``."""
    _need(len(mu), 2, "posterior rows")
    return int((mu.detach().double().var(0) > threshold).sum())


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


def _check_finite(rows: Tensor, what: str) -> None:
    if not torch.isfinite(rows).all():
        raise TrainingError(f"{what} contain NaN or infinite values; the generator diverged: "
                            "lower generator.lr or set generator.grad_clip")


def latent_usage(mu: Tensor, logvar: Tensor, *, where: str, threshold: float = 0.01) -> Scores:
    """``active_units`` and ``kl`` (total: the sum over dimensions of :func:`kl_per_dimension`)
    of one generator's posterior means and log-variances ``[n, z]`` (``VAEGenerator.encode``).
    Raises TrainingError, naming ``where``, on NaN or infinite values."""
    _check_finite(mu, f"{where}: posterior means")
    _check_finite(logvar, f"{where}: posterior log-variances")
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
    _require(distances is not None, "no training rows given (train_by_class=None)")
    return distances


def _scores(real: Tensor, generated: Tensor, train: Tensor | None, count: int, k: int,
            permutations: int, rng: torch.Generator,
            names: Collection[str] | None = None) -> Scores:
    """Every metric (or those in ``names``) of one class, or of the pool, on rows already
    subsampled."""
    real, generated = _rows(real), _rows(generated)
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
    _check_finite(_rows(generated), "generated samples")
    rng = torch.Generator().manual_seed(seed)
    return _scores(real, generated, train, len(generated), k, permutations, rng,
                   metrics).values


def evaluate_diversity(generated: Tensor) -> dict[str, float]:
    """Mean per-dimension standard deviation (``std``) and mean pairwise distance of generated
    rows: their diversity, without real rows to compare with."""
    rows = _rows(generated)
    _require(len(rows) >= 2, f"needs 2 or more generated rows, got {len(rows)}")
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
    full number of generated rows, and training rows are never subsampled. Raises TrainingError,
    naming ``where`` and the class, if generated rows contain NaN or infinite values."""
    classes = list(dict.fromkeys([*real_by_class, *generated_by_class]))
    if not classes:
        raise ValueError("generator_report needs at least one class")
    for name, rows in generated_by_class.items():
        _check_finite(rows, f"{where}, class {name}: generated samples")
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
                         _subsample([generated], max_rows, rng), train, len(generated), k,
                         permutations, rng)
        report["per_class"][name] = scores.values
        if scores.undefined:
            report["undefined"]["per_class"][name] = scores.undefined
    train = None if train_by_class is None else torch.cat(
        [rows_of(train_by_class, name) for name in classes])
    pooled = _scores(_subsample([rows_of(real_by_class, c) for c in classes], max_rows, rng),
                     _subsample([rows_of(generated_by_class, c) for c in classes], max_rows, rng),
                     train, sum(len(rows_of(generated_by_class, c)) for c in classes), k,
                     permutations, rng)
    report["pooled"] = pooled.values
    report["undefined"]["pooled"] = pooled.undefined
    return report
