"""DP-SGD training of a stack of VAE generators (``privacy=dp`` with generators).

Generator ``g`` of a node models rows no other generator of that node sees, so each of its
epochs takes ``ceil(n_g / batch_size)`` steps whose minibatches are Poisson-sampled from its own
``n_g`` rows (rate ``batch_size / n_g``). Each row's loss is the loss of a minibatch of that row
alone, which is why ``privacy=dp`` asks for a learned decoder variance (checks in
:mod:`flcore.config.algorithm_checks`): the default one couples a minibatch's rows.

A VAE is a stack of linear layers applied to each row on its own, so a row's gradient of layer
weights is the outer product of the layer's input ``a`` and the gradient ``g`` at its output,
and its norm is ``|a| |g|`` (Goodfellow 2015): one ordinary backward pass gives every row's
gradient norm, and the clipped sum is one ``einsum`` of ``a`` and the rescaled ``g``, so no
per-row gradient is ever built (the ghost clipping of Li et al. 2022). It equals clipping
per-sample gradients from ``torch.func`` (``tests/test_dp_generators.py``).
:func:`~flcore.privacy.dpsgd.noisy_mean` then noises each generator's sum from its own stream.
"""

from collections.abc import Callable

import torch
from torch import nn

from flcore.clients.protocol import PrivacySpec
from flcore.privacy.accounting import use
from flcore.privacy.dpsgd import noisy_mean
from flcore.trainmodel.optim import NonFiniteFlags, StackedAdam
from flcore.trainmodel.vae import StackedLinear, VAEGenerator, VAELoss

#: What each step logs per generator, in :class:`~flcore.trainmodel.bank_training.EpochLog`'s
#: order: total, recon, kl, similarity, mse, sigma2, effective_beta.
TERMS = 7


def clipped_sums(model: VAEGenerator, loss_fn: VAELoss, x: torch.Tensor, noise: torch.Tensor,
                 cond: torch.Tensor | None, epoch: int, counted: torch.Tensor, max_norm: float
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each generator's sum ``[K, ...]`` over its ``counted [K, W]`` rows of ``x [K, W, F]``
    of their loss gradients, each clipped to norm ``max_norm`` over all of the generator's
    parameters (in ``model.parameters()`` order), and every row's loss terms ``[TERMS, K,
    W]``."""
    k, w = x.shape[:2]
    layers = {name: m for name, m in model.named_modules() if isinstance(m, StackedLinear)}
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[torch.Tensor], out: torch.Tensor) -> None:
            inputs[name], outputs[name] = args[0].detach(), out
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    try:
        recon, mu, logvar = model(x, noise, cond)
    finally:
        for handle in handles:
            handle.remove()
    log_var = None if model.dec_logvar is None else model.dec_logvar.repeat_interleave(w, 0)

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(k * w, 1, *t.shape[2:])

    terms = loss_fn(rows(recon), rows(x), rows(mu), rows(logvar), epoch,
                    torch.ones(k * w, 1, dtype=torch.bool, device=x.device), log_var)
    per_row = terms.total.view(k, w)
    wrt = [outputs[name] for name in layers] + ([] if log_var is None else [log_var])
    found = torch.autograd.grad(torch.where(counted, per_row, 0.0).sum(), wrt)
    at_output = dict(zip(layers, found, strict=False))
    squared = torch.zeros(k, w, device=x.device)
    for name, g in at_output.items():
        g_norm = g.square().sum(-1)
        squared += inputs[name].square().sum(-1) * g_norm + g_norm
    if log_var is not None:
        var_grad = found[-1].view(k, w)
        squared += var_grad.square()
    scale = ((max_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0) * counted).detach()
    summed = {}
    for name, g in at_output.items():
        summed[f"{name}.weight"] = torch.einsum("kw,kwi,kwo->kio", scale, inputs[name], g)
        summed[f"{name}.bias"] = torch.einsum("kw,kwo->ko", scale, g).unsqueeze(1)
    if log_var is not None:
        summed["dec_logvar"] = (scale * var_grad).sum(1).view(k, 1, 1)
    logged = torch.stack([terms.total, terms.recon, terms.kl, terms.similarity, terms.mse,
                          terms.sigma2, terms.effective_beta]).detach().view(TERMS, k, w)
    return [summed[name] for name, _ in model.named_parameters()], logged


def poisson_rows(counts: list[int], rates: list[float], on: list[bool],
                 rngs: list[torch.Generator], n_max: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A step's Poisson samples: row indices ``[K, W]`` (each generator's sampled rows first,
    in order), whether each is sampled ``[K, W]`` and how many each took. Generator ``g`` draws
    ``counts[g]`` uniforms from ``rngs[g]`` when ``on[g]``, as it would trained alone."""
    picks = torch.zeros(len(counts), max(n_max, 1), dtype=torch.bool, device=device)
    for g, (n, rate) in enumerate(zip(counts, rates, strict=True)):
        if on[g] and n:
            picks[g, :n] = torch.rand(n, generator=rngs[g], device=device) < rate
    taken = picks.sum(1).tolist()
    width = max(1, max(taken))
    index = torch.argsort((~picks).to(torch.int8), dim=1, stable=True)[:, :width]
    sampled = torch.arange(width, device=device) < torch.tensor(taken, device=device)[:, None]
    return index, sampled, taken


def private_epoch(model: VAEGenerator, optimizer: StackedAdam, loss_fn: VAELoss,
                  x_all: torch.Tensor, cond_all: torch.Tensor | None, counts: list[int],
                  epoch: int, batch_size: int, rngs: list[torch.Generator], noise_std: float,
                  privacy: PrivacySpec, flags: NonFiniteFlags,
                  draw: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One DP-SGD epoch of every generator (see the module): their rows ``x_all [K, n_max,
    F]`` (``counts`` real), at schedule epoch ``epoch``; ``draw(rngs, valid, shape, width,
    device)`` draws the latent and augmentation noise. Returns the terms summed over the sampled
    rows ``[TERMS, K]`` and the rows sampled ``[K]``."""
    k, n_max, _ = x_all.shape
    device = x_all.device
    uses = [use(n, batch_size, 1) for n in counts]
    rates, per_epoch = [u.rate for u in uses], [u.steps for u in uses]
    expected = torch.tensor([r * n for r, n in zip(rates, counts, strict=True)],
                            device=device).clamp(min=1e-12)
    sums = torch.zeros(TERMS, k, device=device)
    seen = torch.zeros(k, device=device)
    for slot in range(max(per_epoch, default=0)):
        on = [slot < p for p in per_epoch]
        index, sampled, taken = poisson_rows(counts, rates, on, rngs, n_max, device)
        active = torch.tensor(on, device=device) & ~flags.bad
        x = torch.gather(x_all, 1, index[..., None].expand(-1, -1, x_all.shape[-1]))
        cond = (None if cond_all is None else
                torch.gather(cond_all, 1, index[..., None].expand(-1, -1, cond_all.shape[-1])))
        width = index.shape[1]
        noise = draw(rngs, taken, (model.latent,), width, device)
        if noise_std > 0:
            x = x + noise_std * draw(rngs, taken, tuple(x.shape[2:]), width, device)
        counted = sampled & active[:, None]
        summed, terms = clipped_sums(model, loss_fn, x, noise, cond, epoch, counted,
                                     privacy.max_grad_norm)
        mean_loss = torch.where(counted, terms[0], 0.0).sum(1) / counted.sum(1).clamp(min=1)
        failed = flags.update(mean_loss, counted.any(1), slot)
        active = active & ~failed
        counted = counted & ~failed[:, None]
        noisy = noisy_mean(summed, privacy.max_grad_norm, privacy.noise_multiplier, expected,
                           [r if a else None for r, a in zip(rngs, active.tolist(),
                                                             strict=True)])
        optimizer.step(active, noisy)
        sums += torch.where(counted, terms, 0.0).sum(2)
        seen += counted.sum(1)
    return sums, seen
