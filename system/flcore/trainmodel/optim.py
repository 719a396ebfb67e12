"""Training K models stacked along a leading axis as one: Adam or AdamW that steps only the
active models, each with its own step count (:class:`StackedAdam`), gradient clipping per model
(:func:`clip_per_model`) and device-side flags of non-finite losses (:class:`NonFiniteFlags`).
K stacked models then take the steps each would take alone, and a step loop never waits for
the host. Used by the generator banks and by the batched adapter executor."""

from collections.abc import Sequence

import torch


def _has_fused_adam(device: torch.device) -> bool:
    """Whether torch has a fused Adam kernel for ``device`` (CPU, CUDA, MPS, ...)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # pragma: no cover - older or newer torch
        return False
    return device.type in _get_fused_kernels_supported_devices()


def _per_model(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value [K]`` shaped to broadcast against ``like [K, ...]``."""
    return value.view(-1, *([1] * (like.dim() - 1)))


class StackedAdam:
    """Adam (torch's formulation), or AdamW with ``weight_decay > 0`` (decoupled decay,
    Loshchilov & Hutter 2019), over parameters ``[K, ...]``: ``step(active)`` updates only the
    models where ``active [K]`` is true, each with its own step count and bias corrections, so
    the update equals K independent torch optimizers. ``lr`` is one learning rate, or one per
    parameter (torch's parameter groups); ``step(..., lr=)`` overrides it with one per model.

    A step takes one of two forms, neither waiting for the host. The fused form (where torch has
    a fused Adam kernel for the device, without weight decay or per-model rates) steps each
    model's slices with its own step count, skipped inside the kernel (its ``found_inf`` flag,
    as for AMP's skipped steps) when the model is inactive; on the CPU, where reading a flag
    costs no round trip, a step in which every model is active at the same count is one fused
    step over the whole tensors. The elementwise form computes every model's update and keeps
    it with ``torch.where`` where the model is active, so an inactive model stays bit for bit
    as it was, even with a non-finite gradient."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float | Sequence[float] = 1e-3, *,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lrs = [lr] * len(self.params) if isinstance(lr, int | float) else list(lr)
        if len(self.lrs) != len(self.params):
            raise ValueError(f"StackedAdam: {len(self.params)} parameters but {len(self.lrs)} "
                             "learning rates")
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        first = self.params[0]
        self.steps = torch.zeros(first.shape[0], device=first.device)
        self.fused = _has_fused_adam(first.device) and weight_decay == 0

    @torch.no_grad()
    def step(self, active: torch.Tensor, grads: Sequence[torch.Tensor] | None = None,
             lr: torch.Tensor | None = None) -> None:
        """One step of the models where ``active [K]`` (bool, on the device) is true, with
        ``grads`` (default: each parameter's ``.grad``) and, if given, per-model learning rates
        ``lr [K]`` (a schedule; the elementwise form)."""
        grads = [p.grad for p in self.params] if grads is None else list(grads)
        self.steps += active.to(self.steps.dtype)
        if self.fused and lr is None:
            self._fused_step(grads, active)
            return
        if lr is None:
            rates = {x: torch.full_like(self.steps, x) for x in set(self.lrs)}
            self._elementwise_step(grads, active, [rates[x] for x in self.lrs])
        else:
            self._elementwise_step(grads, active, [lr] * len(self.params))

    def _fused_step(self, grads: list[torch.Tensor], active: torch.Tensor) -> None:
        b1, b2 = self.betas
        groups: dict[float, list[int]] = {}  # one fused call per learning rate
        for i, lr in enumerate(self.lrs):
            groups.setdefault(lr, []).append(i)
        options = {"beta1": b1, "beta2": b2, "weight_decay": 0.0, "eps": self.eps,
                   "amsgrad": False, "maximize": False}
        if self.steps.device.type == "cpu" and bool(active.all()) and bool(
                (self.steps == self.steps[0]).all()):
            # On the CPU reading the flags is no device round trip, and one fused step over
            # whole tensors is several times faster there than K steps over their slices.
            for lr, ids in groups.items():
                torch._fused_adam_([self.params[i].detach() for i in ids],
                                   [grads[i] for i in ids], [self.m[i] for i in ids],
                                   [self.v[i] for i in ids], [], [self.steps[0]] * len(ids),
                                   lr=lr, **options)
            return
        skip = (~active).to(self.steps.dtype).unbind(0)
        steps = self.steps.unbind(0)
        rows = [t.detach().unbind(0) for t in self.params]
        grad_rows = [g.unbind(0) for g in grads]
        ms = [m.unbind(0) for m in self.m]
        vs = [v.unbind(0) for v in self.v]
        for k in range(len(steps)):
            for lr, ids in groups.items():
                torch._fused_adam_([rows[i][k] for i in ids], [grad_rows[i][k] for i in ids],
                                   [ms[i][k] for i in ids], [vs[i][k] for i in ids], [],
                                   [steps[k]] * len(ids), lr=lr, found_inf=skip[k], **options)

    def _elementwise_step(self, grads: list[torch.Tensor], active: torch.Tensor,
                          lrs: list[torch.Tensor]) -> None:
        b1, b2 = self.betas
        active = active.bool()
        t = self.steps.clamp(min=1)
        correction = (1 - b2**t).sqrt()
        scaled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per distinct lr tensor
        for p, g, m, v, lr in zip(self.params, grads, self.m, self.v, lrs, strict=True):
            if id(lr) not in scaled:
                scaled[id(lr)] = (lr / (1 - b1**t), lr * self.weight_decay)
            step_size, decay = scaled[id(lr)]
            on = _per_model(active, p)
            m_new = m.lerp(g, 1 - b1)
            v_new = v * b2 + (1 - b2) * g * g
            p_new = p * (1 - _per_model(decay, p))
            p_new = p_new - _per_model(step_size, p) * m_new / (
                v_new.sqrt() / _per_model(correction, p) + self.eps)
            p.copy_(torch.where(on, p_new, p))
            m.copy_(torch.where(on, m_new, m))
            v.copy_(torch.where(on, v_new, v))

    def state_dict(self) -> dict[str, object]:
        return {"m": self.m, "v": self.v, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.m = [t.to(p.device) for t, p in zip(state["m"], self.params, strict=True)]
        self.v = [t.to(p.device) for t, p in zip(state["v"], self.params, strict=True)]
        self.steps = state["steps"].to(self.params[0].device)

    def load_torch(self, k: int, state: dict) -> None:
        """Model ``k``'s slice from a ``torch.optim.Adam``/``AdamW`` state dict of one model
        (its parameters in this optimizer's order)."""
        for i in range(len(self.params)):
            entry = state["state"][i]
            self.m[i][k] = entry["exp_avg"]
            self.v[i][k] = entry["exp_avg_sq"]
            self.steps[k] = float(entry["step"])

    def export_torch(self, k: int, groups: list[dict]) -> dict:
        """Model ``k``'s slice as a ``torch.optim.Adam``/``AdamW`` state dict with
        ``param_groups`` ``groups``."""
        step = float(self.steps[k])
        return {"state": {i: {"step": torch.tensor(step), "exp_avg": self.m[i][k].clone(),
                              "exp_avg_sq": self.v[i][k].clone()}
                          for i in range(len(self.params))},
                "param_groups": [dict(g) for g in groups]}


def clip_per_model(grads: Sequence[torch.Tensor], max_norm: float, *,
                   flat: bool = False) -> torch.Tensor:
    """Scale each model's gradients ``[K, ...]`` in place to norm <= ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` would for that model alone; return the norms ``[K]``.
    The norm is that of the per-tensor norms (torch's form) or, with ``flat``, the square root
    of the sum of all squared entries (the batched adapter executor's form): the two agree up to
    float rounding, and each caller keeps its own so that its runs stay bit for bit the same."""
    if flat:
        norms = torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()
    else:
        norms = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]), dim=0)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(_per_model(scale, g))
    return norms


class NonFiniteFlags:
    """Each model's first non-finite loss of an epoch and its step, flagged on the device so
    that the step loop makes no host round trip; :meth:`failed` reads them once an epoch."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.bad = torch.zeros(k, dtype=torch.bool, device=device)
        self.value = torch.zeros(k, device=device)
        self.step = torch.zeros(k, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, active: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Flag the models not flagged yet whose ``loss [K]`` at ``step`` is not finite where
        ``active [K]``; return that mask of newly flagged models."""
        now = active & ~self.bad & ~torch.isfinite(loss)
        self.value = torch.where(now, loss.detach(), self.value)
        self.step = torch.where(now, step, self.step)
        self.bad |= now
        return now

    def failed(self) -> list[int]:
        """The flagged models, the earliest step first (the one host read)."""
        if not bool(self.bad.any()):
            return []
        steps = self.step.tolist()
        return sorted(self.bad.nonzero().flatten().tolist(), key=lambda k: (steps[k], k))
