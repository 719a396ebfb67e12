"""Rows as the generative metrics take them (flattened embeddings, float64) and the two plain
errors a metric raises: :class:`UndefinedMetric` when it has no value for its inputs, and
:class:`NonFiniteRows` when they hold NaN or infinity. Callers add their context (a run turns
the latter into a TrainingError)."""

import torch
from torch import Tensor


class UndefinedMetric(ValueError):
    """A metric has no value for these inputs (too few rows, zero spread); the message says why."""


class NonFiniteRows(ValueError):
    """Generated samples or posterior values hold NaN or infinity; the message names them."""


def require(ok: bool, reason: str) -> None:
    """Raise :class:`UndefinedMetric` with ``reason`` unless ``ok``."""
    if not ok:
        raise UndefinedMetric(reason)


def need(count: int, minimum: int, what: str) -> None:
    """A metric needs ``minimum`` rows of ``what``."""
    require(count >= minimum, f"needs {minimum} or more {what}, got {count}")


def need_neighbours(count: int, k: int, what: str) -> None:
    """A k-th nearest neighbour within a set needs k + 1 rows."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    need(count, k + 1, f"{what} rows (k + 1, k={k})")


def as_rows(x: Tensor) -> Tensor:
    """``x`` as float64 rows ``[n, d]`` (trailing axes flattened)."""
    return x.detach().double().flatten(1)


def euclidean(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances ``[len(a), len(b)]`` through the Gram matrix; callers centre the rows
    first, which keeps ``‖a‖² + ‖b‖² − 2ab`` precise."""
    squared = a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T
    return squared.clamp_min(0).sqrt()


def check_finite(values: Tensor, what: str) -> None:
    """Raise :class:`NonFiniteRows` naming ``what`` if ``values`` hold NaN or infinity."""
    if not torch.isfinite(values).all():
        raise NonFiniteRows(f"{what} contain NaN or infinite values; the generator diverged: "
                            "lower generator.lr or set generator.grad_clip")
