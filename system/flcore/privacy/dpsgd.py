"""The private half of the DP-SGD step (Abadi et al. 2016) of stacked models: each model's sum
of per-sample gradients clipped to ``max_norm`` (ghost-clipped by
:mod:`flcore.privacy.training` and :mod:`flcore.privacy.generator_training`) gets Gaussian
noise of standard deviation ``noise_multiplier * max_norm`` and is divided by the expected batch
size (the Poisson sampling rate times the rows): Opacus' ``DPOptimizer`` step on a leading
model axis, so that a stack of nodes' adapters or generators steps privately at its speed; and
the Poisson sample of a step."""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch


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
