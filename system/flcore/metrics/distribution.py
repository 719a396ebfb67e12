"""How far generated rows are from real ones as distributions: Fréchet distance, MMD²,
precision / recall / density / coverage, 1-NN two-sample accuracy, and the spread and class means
of the generated rows. Rows are flattened embeddings: real ``[n, d]``, generated ``[m, d]``; all
arithmetic is float64."""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from flcore.metrics.rows import as_rows, euclidean, need, need_neighbours, require

_PERMUTATION_CHUNK = 256  # labellings per matmul in the MMD² test: memory N x 256


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
    x, y = as_rows(real), as_rows(generated)
    need(len(x), 2, "real rows")
    need(len(y), 2, "generated rows")
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
    z = torch.cat([as_rows(real), as_rows(generated)])
    z = z - z.mean(0)
    return PairwiseDistances(euclidean(z, z).fill_diagonal_(0), len(real))


def _kth_neighbour(within: Tensor, k: int) -> Tensor:
    """Distance of each row of a set to its k-th nearest other row of that set."""
    return within.clone().fill_diagonal_(math.inf).kthvalue(k, dim=1).values


def precision(distances: PairwiseDistances, k: int = 5) -> float:
    """Share of generated rows inside the k-NN ball of at least one real row (Kynkäänniemi et al.
    2019, as computed by Naeem et al. 2020): fidelity."""
    need_neighbours(distances.n, k, "real")
    need(distances.m, 1, "generated rows")
    inside = distances.cross < _kth_neighbour(distances.real, k)[:, None]
    return float(inside.any(0).double().mean())


def recall(distances: PairwiseDistances, k: int = 5) -> float:
    """Share of real rows inside the k-NN ball of at least one generated row (Kynkäänniemi et al.
    2019, as computed by Naeem et al. 2020): how much of the real data is reached."""
    need_neighbours(distances.m, k, "generated")
    need(distances.n, 1, "real rows")
    inside = distances.cross < _kth_neighbour(distances.generated, k)[None, :]
    return float(inside.any(1).double().mean())


def density(distances: PairwiseDistances, k: int = 5) -> float:
    """Mean over generated rows of the number of real k-NN balls containing them, divided by k
    (Naeem et al. 2020): about 1 for matching distributions, unbounded above."""
    need_neighbours(distances.n, k, "real")
    need(distances.m, 1, "generated rows")
    inside = distances.cross < _kth_neighbour(distances.real, k)[:, None]
    return float(inside.sum(0).double().mean() / k)


def coverage(distances: PairwiseDistances, k: int = 5) -> float:
    """Share of real rows whose k-NN ball contains at least one generated row (Naeem et al.
    2020): mode coverage, robust to generated outliers."""
    need_neighbours(distances.n, k, "real")
    need(distances.m, 1, "generated rows")
    nearest = distances.cross.min(1).values
    return float((nearest < _kth_neighbour(distances.real, k)).double().mean())


def one_nn_accuracy(distances: PairwiseDistances) -> float:
    """Leave-one-out 1-NN two-sample accuracy over real ∪ generated (Lopez-Paz & Oquab 2017; Xu
    et al. 2018), balanced: the mean of the real rows' and the generated rows' accuracies, so that
    chance stays ≈ 0.5 when m ≠ n (with m = n it is the plain accuracy). 0.5: indistinguishable,
    1.0: separable, below 0.5: generated rows sit on top of real ones."""
    need(distances.n, 1, "real rows")
    need(distances.m, 1, "generated rows")
    nearest = distances.union.clone().fill_diagonal_(math.inf).argmin(1)
    is_real = torch.arange(len(nearest), device=nearest.device) < distances.n
    correct = (is_real[nearest] == is_real).double()
    return float((correct[: distances.n].mean() + correct[distances.n :].mean()) / 2)


def mean_pairwise_distance(distances: PairwiseDistances) -> float:
    """Mean Euclidean distance between distinct generated rows: diversity (0 = collapse)."""
    m = distances.m
    need(m, 2, "generated rows")
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
    need(n, 2, "real rows")
    need(m, 2, "generated rows")
    pairs = torch.ones_like(distances.union, dtype=torch.bool).triu(1)
    sigma = float(distances.union[pairs].median())
    require(sigma > 0, "the median pairwise distance is 0 (most rows coincide)")
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
    x, y = as_rows(real), as_rows(generated)
    need(len(x), 2, "real rows")
    need(len(y), 2, "generated rows")
    real_spread = x.std(0).mean()
    require(bool(real_spread > 0), "the real rows have zero spread")
    return float(y.std(0).mean() / real_spread)


def mean_l2_distance(real: Tensor, generated: Tensor) -> float:
    """‖mean(real) − mean(generated)‖₂ (``l2_distance``): how far apart the class means are."""
    x, y = as_rows(real), as_rows(generated)
    need(len(x), 1, "real rows")
    need(len(y), 1, "generated rows")
    return float((x.mean(0) - y.mean(0)).norm())


def mean_cosine_similarity(real: Tensor, generated: Tensor) -> float:
    """Cosine similarity of mean(real) and mean(generated) (``cosine_similarity``): whether the
    class means point the same way."""
    x, y = as_rows(real), as_rows(generated)
    need(len(x), 1, "real rows")
    need(len(y), 1, "generated rows")
    a, b = x.mean(0), y.mean(0)
    norms = a.norm() * b.norm()
    require(bool(norms > 0), "a class mean is the zero vector")
    return float(a @ b / norms)
