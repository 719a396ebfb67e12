"""Whether generated rows copy the generator's training rows (DCR ratio, near copies), and how
much of a VAE's latent code carries information (KL per dimension, active units)."""

from dataclasses import dataclass

from torch import Tensor

from flcore.metrics.rows import as_rows, euclidean, need, require

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
    distances = euclidean(rows - shift, train - shift)
    return distances.topk(min(count, len(train)), dim=1, largest=False).values


def training_distances(generated: Tensor, train: Tensor, held_out: Tensor) -> TrainingDistances:
    """What the DCR ratio and the near-copy share need, for generated and held-out real rows
    against the generator's training rows."""
    g, t, h = as_rows(generated), as_rows(train), as_rows(held_out)
    return TrainingDistances(_nearest_training(g, t, 2), _nearest_training(h, t, 1), len(t))


def dcr_ratio(distances: TrainingDistances) -> float:
    """Median distance to the closest training row (DCR) of the generated rows over that of
    held-out real rows, which the generator never saw (Platzer & Reutterer 2021). Below 1: the
    generated rows are closer to the training data than fresh real data is (memorization); ≈ 1:
    no closer. Medians are ``torch.median`` (lower middle value for an even count)."""
    need(distances.train_rows, 1, "training rows")
    need(len(distances.generated), 1, "generated rows")
    need(len(distances.held_out), 1, "held-out real rows")
    fresh = distances.held_out[:, 0].median()
    require(bool(fresh > 0), "the held-out rows' median distance to the training rows is 0 "
                              "(they are training rows)")
    return float(distances.generated[:, 0].median() / fresh)


def near_copy_share(distances: TrainingDistances, ratio: float = 1 / 3) -> float:
    """Share of generated rows that copy one training row: distance to the nearest training row
    below ``ratio`` × that to the second nearest, or exactly 0 (the 1/3 rule of Yoon et al. 2023
    and Gu et al. 2023). Scale-free; meant for high-dimensional rows, where fresh samples have
    nearest/second-nearest ratios near 1."""
    need(distances.train_rows, 2, "training rows")
    need(len(distances.generated), 1, "generated rows")
    nearest = distances.generated
    copies = (nearest[:, 0] < ratio * nearest[:, 1]) | (nearest[:, 0] == 0)
    return float(copies.double().mean())


# Latent usage of a VAE


def kl_per_dimension(mu: Tensor, logvar: Tensor) -> Tensor:
    """``[z]``: mean over rows of KL(N(μ, σ²) ‖ N(0, 1)) in each latent dimension, closed form
    (Kingma & Welling 2014); near 0 in a dimension the decoder ignores."""
    need(len(mu), 1, "posterior rows")
    mu, logvar = mu.detach().double(), logvar.detach().double()
    return (0.5 * (mu.square() + logvar.exp() - 1 - logvar)).mean(0)


def active_units(mu: Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies over the data: Var_x(E_q[z | x]) > threshold
    (Burda et al. 2016), unbiased (n − 1) variance of ``mu`` ``[n, z]``."""
    need(len(mu), 2, "posterior rows")
    return int((mu.detach().double().var(0) > threshold).sum())
