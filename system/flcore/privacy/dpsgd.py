"""The DP-SGD step (Abadi et al. 2016) on per-sample gradients of stacked models: each sample's
gradient is clipped to ``max_norm`` over all of its model's parameters, the clipped gradients of
a model's sampled rows are summed, Gaussian noise of standard deviation ``noise_multiplier *
max_norm`` is added and the sum is divided by the expected batch size (the Poisson sampling
rate times the rows). It is Opacus' ``DPOptimizer`` step, on a leading model axis, so that a
stack of nodes' adapters or generators steps privately at the stack's speed."""

from collections.abc import Sequence

import torch


def per_sample_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[K, B]``: each sample's gradient norm over every parameter of its model, for
    per-sample gradients ``[K, B, ...]``."""
    return torch.stack([torch.linalg.vector_norm(g.flatten(2), dim=2) for g in grads]
                       ).square().sum(0).sqrt()


def clipped_sum(grads: Sequence[torch.Tensor], sampled: torch.Tensor,
                max_norm: float) -> list[torch.Tensor]:
    """Each model's sum ``[K, ...]`` over its ``sampled [K, B]`` rows of their gradients scaled
    to norm at most ``max_norm`` (by ``max_norm / (norm + 1e-6)``, as Opacus does)."""
    scale = (max_norm / (per_sample_norms(grads) + 1e-6)).clamp(max=1.0) * sampled
    return [torch.einsum("kb,kb...->k...", scale.to(g.dtype), g) for g in grads]


def private_gradients(grads: Sequence[torch.Tensor], sampled: torch.Tensor, max_norm: float,
                      noise_multiplier: float, expected_batch: torch.Tensor,
                      generators: Sequence[torch.Generator | None]) -> list[torch.Tensor]:
    """The DP-SGD gradients ``[K, ...]`` of per-sample gradients ``[K, B, ...]``: the clipped
    sum (:func:`clipped_sum`) made private by :func:`noisy_mean`."""
    return noisy_mean(clipped_sum(grads, sampled, max_norm), max_norm, noise_multiplier,
                      expected_batch, generators)


def noisy_mean(summed: Sequence[torch.Tensor], max_norm: float, noise_multiplier: float,
               expected_batch: torch.Tensor, generators: Sequence[torch.Generator | None]
               ) -> list[torch.Tensor]:
    """Clipped sums ``[K, ...]`` plus Gaussian noise of standard deviation ``noise_multiplier *
    max_norm``, over ``expected_batch [K]``. Model ``k``'s noise is drawn from
    ``generators[k]``, parameter by parameter in order, so a model's noise does not depend on
    the models stacked beside it; a model without a generator (one that does not step) draws
    none."""
    std = noise_multiplier * max_norm
    out = []
    for total in summed:
        noise = torch.stack([torch.zeros(total.shape[1:], dtype=total.dtype, device=total.device)
                             if g is None
                             else torch.normal(0.0, std, total.shape[1:], generator=g,
                                               device=g.device, dtype=total.dtype)
                             for g in generators])
        shape = (-1,) + (1,) * (total.dim() - 1)
        out.append((total + noise.to(total.device)) / expected_batch.view(shape).to(total.dtype))
    return out


def poisson_sample(rows: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Which of ``rows`` rows a Poisson-sampled step uses: each independently with ``rate``."""
    return torch.rand(rows, generator=generator) < rate
