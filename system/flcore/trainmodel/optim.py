"""Optimizer pieces of the stacked generator banks: Adam that steps only the generators that had
data (:class:`MaskedAdam`) and gradient clipping per generator, so K generators trained as one
stacked model take the steps each would take alone."""

from collections.abc import Sequence

import torch
from torch import nn


def _has_fused_adam(device: torch.device) -> bool:
    """Whether torch has a fused Adam kernel for ``device`` (CPU, CUDA, MPS, ...)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # pragma: no cover - older or newer torch
        return False
    return device.type in _get_fused_kernels_supported_devices()


class MaskedAdam:
    """Adam over parameters with a leading generator axis; ``step(active)`` updates only the
    generators that had data, each with its own step count and bias corrections, so the update
    equals K independent Adam optimizers (torch's formulation).

    On an accelerator the step is branch-free and never waits for the host: the active mask
    and the step counts stay on the device. Where torch has a fused Adam kernel, each
    generator's slices of the parameters take one fused step with its own step count, skipped
    inside the kernel (its ``found_inf`` flag, as for AMP's skipped steps) when the generator is
    inactive. Elsewhere an elementwise form uses ``torch.where`` so inactive generators stay
    untouched. On the CPU, where reading a flag costs no round trip, a step in which every
    generator is active at the same count is one fused step over the whole tensors. ``lr`` is
    one learning rate, or one per parameter (torch's parameter groups)."""

    def __init__(self, params: list[nn.Parameter], k: int, lr: float | Sequence[float],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lrs = [lr] * len(params) if isinstance(lr, int | float) else list(lr)
        if len(self.lrs) != len(params):
            raise ValueError(f"MaskedAdam: {len(params)} parameters but {len(self.lrs)} "
                             "learning rates")
        self.params, self.betas, self.eps = params, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps = torch.zeros(k, device=params[0].device)
        self.fused = _has_fused_adam(params[0].device)

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """One Adam step for the generators where ``active [K]`` (bool, on the device) is true."""
        self.steps += active.to(self.steps.dtype)
        if self.fused:
            self._fused_step(active)
        else:
            self._elementwise_step(active)

    def _groups(self) -> list[tuple[float, list[int]]]:
        """The parameters' indices grouped by learning rate (one fused call per group)."""
        groups: dict[float, list[int]] = {}
        for i, lr in enumerate(self.lrs):
            groups.setdefault(lr, []).append(i)
        return list(groups.items())

    def _fused_step(self, active: torch.Tensor) -> None:
        b1, b2 = self.betas
        groups = self._groups()
        if self.steps.device.type == "cpu" and bool(active.all()) and bool(
                (self.steps == self.steps[0]).all()):
            # On the CPU reading the flags is no device round trip, and one fused step over
            # whole tensors is several times faster there than K steps over their slices.
            for lr, ids in groups:
                torch._fused_adam_([self.params[i].detach() for i in ids],
                                   [self.params[i].grad for i in ids], [self.m[i] for i in ids],
                                   [self.v[i] for i in ids], [], [self.steps[0]] * len(ids),
                                   lr=lr, beta1=b1, beta2=b2, weight_decay=0.0, eps=self.eps,
                                   amsgrad=False, maximize=False)
            return
        skip = (~active).to(self.steps.dtype).unbind(0)
        steps = self.steps.unbind(0)
        rows = [t.detach().unbind(0) for t in self.params]
        grads = [p.grad.unbind(0) for p in self.params]
        ms = [m.unbind(0) for m in self.m]
        vs = [v.unbind(0) for v in self.v]
        for g in range(len(steps)):
            for lr, ids in groups:
                torch._fused_adam_([rows[i][g] for i in ids], [grads[i][g] for i in ids],
                                   [ms[i][g] for i in ids], [vs[i][g] for i in ids], [],
                                   [steps[g]] * len(ids), lr=lr, beta1=b1, beta2=b2,
                                   weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False,
                                   found_inf=skip[g])

    def _elementwise_step(self, active: torch.Tensor) -> None:
        b1, b2 = self.betas
        on = active.to(self.steps.dtype)
        t = self.steps.clamp(min=1)
        inv_sqrt_bc2 = (1 - b2**t).rsqrt()
        for p, m, v, lr in zip(self.params, self.m, self.v, self.lrs, strict=True):
            view = (-1,) + (1,) * (p.dim() - 1)
            keep = active.view(view)
            step_size = -lr / (1 - b1**t)
            g = torch.where(keep, p.grad, 0.0)
            m.lerp_(g, ((1 - b1) * on).view(view))
            v.mul_((1 - (1 - b2) * on).view(view)).addcmul_(g, g * ((1 - b2) * on).view(view))
            denom = v.sqrt().mul_(inv_sqrt_bc2.view(view)).add_(self.eps)
            p.add_(torch.where(keep, m * step_size.view(view) / denom, 0.0))

    def state_dict(self) -> dict[str, object]:
        return {"m": self.m, "v": self.v, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.m = [t.to(p.device) for t, p in zip(state["m"], self.params, strict=True)]
        self.v = [t.to(p.device) for t, p in zip(state["v"], self.params, strict=True)]
        self.steps = state["steps"].to(self.params[0].device)


def clip_per_generator(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale each generator's gradients to norm <= ``max_norm`` (as ``clip_grad_norm_`` would for
    that generator alone); return the per-generator norms ``[K]``."""
    norms = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad.flatten(1), dim=1) for p in params]), dim=0)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.view((-1,) + (1,) * (p.dim() - 1)))
    return norms
