"""The DP-SGD step (Abadi et al. 2016) on per-sample gradients of stacked models: each sample's
gradient is clipped to ``max_norm`` over all of its model's parameters, the clipped gradients of
a model's sampled rows are summed, Gaussian noise of standard deviation ``noise_multiplier *
max_norm`` is added and the sum is divided by the expected batch size (the Poisson sampling
rate times the rows). It is Opacus' ``DPOptimizer`` step, on a leading model axis, so that a
stack of nodes' adapters or generators steps privately at the stack's speed."""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

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
    none. On the CPU the models' draws (a Gaussian per parameter and step: much of DP-SGD's
    cost) run on torch's threads side by side, each model's stream on its own."""
    std = noise_multiplier * max_norm
    noise = [torch.zeros_like(total) for total in summed]

    def draw(k: int) -> None:
        for n in noise:
            n[k].normal_(0.0, std, generator=generators[k])

    drawing = [k for k, g in enumerate(generators) if g is not None]
    threads = torch.get_num_threads()
    if summed and summed[0].device.type == "cpu" and threads > 1 and len(drawing) > 1:
        with ThreadPoolExecutor(min(threads, len(drawing))) as pool:
            list(pool.map(draw, drawing))
    else:
        for k in drawing:
            draw(k)
    out = []
    for n, total in zip(noise, summed, strict=True):
        shape = (-1,) + (1,) * (total.dim() - 1)
        out.append(n.add_(total).div_(expected_batch.view(shape).to(total.dtype)))
    return out


def poisson_sample(rows: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Which of ``rows`` rows a Poisson-sampled step uses: each independently with ``rate``."""
    return torch.rand(rows, generator=generator) < rate
