"""A round's clients trained together as one adapter with a leading client axis.

Each client keeps what makes its training its own: its minibatch order and dropout masks (both
functions of its seed, as in :func:`~flcore.clients.clientbase.fit`), its AdamW state and step
count, its learning-rate schedule, its gradient-norm clip and its data size (a client with fewer
minibatches sits out the steps it does not have). So the result equals the sequential
executor's to float tolerance, while a step costs a few large kernels instead of one small set
per client. The step loop makes no host round trip: non-finite losses are caught by a device-side
flag that is read once an epoch.
"""

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from flcore.clients.clientbase import (
    AdapterJob,
    LocalUpdate,
    RoundSpec,
    SharedTensors,
    check_finite,
    cosine_lr,
    flag_nonfinite,
    minibatch_orders,
)
from flcore.config import AdapterConfig, LrSchedule
from flcore.errors import ResourceError
from flcore.executors.base import Executor
from flcore.runtime import autocast
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter, adapter_outputs, step_keys

log = logging.getLogger(__name__)

BETAS = (0.9, 0.999)
EPS = 1e-8


@dataclass
class Schedule:
    """Every step's minibatch of every client, laid out ``[epochs, slots, clients, ...]``."""

    rows: torch.Tensor  # dataset rows, 0 where padded  [E, S, C, B]
    valid: torch.Tensor  # real rows  [E, S, C, B]
    keys: torch.Tensor  # dropout keys  [E, S, C]
    lr: torch.Tensor  # learning rates  [E, S, C]

    @property
    def active(self) -> torch.Tensor:
        """Clients with a minibatch at each step ``[E, S, C]``."""
        return self.valid.any(-1)


def schedule(jobs: Sequence[AdapterJob], config: AdapterConfig, epochs: int,
             device: torch.device) -> Schedule:
    """Lay out each job's seeded minibatches (as :func:`fit` draws them) on a common grid of
    steps; built on the host once, copied to the device once."""
    b = config.batch_size
    sizes = [len(job.rows) for job in jobs]
    slots = max(math.ceil(n / b) for n in sizes)
    rows = torch.zeros(len(jobs), epochs, slots * b, dtype=torch.long)
    valid = torch.zeros(len(jobs), epochs, slots * b, dtype=torch.bool)
    for c, (job, n) in enumerate(zip(jobs, sizes, strict=True)):
        order = minibatch_orders(n, epochs, job.seed)
        rows[c, :, :n] = job.rows.cpu()[order]
        valid[c, :, :n] = True
    per_epoch = torch.tensor([math.ceil(n / b) for n in sizes])
    step = (torch.arange(epochs).view(-1, 1, 1) * per_epoch
            + torch.arange(slots).view(1, -1, 1))
    seeds = torch.tensor([job.seed & 0xFFFFFFFF for job in jobs])
    lr = (cosine_lr(config.lr, step.double(), (epochs * per_epoch).double())
          if config.lr_schedule is LrSchedule.cosine
          else torch.full(step.shape, config.lr, dtype=torch.float64))
    grid = (len(jobs), epochs, slots, b)
    return Schedule(rows.view(grid).permute(1, 2, 0, 3).contiguous().to(device),
                    valid.view(grid).permute(1, 2, 0, 3).contiguous().to(device),
                    step_keys(seeds, step).to(device), lr.to(device, torch.get_default_dtype()))


def _per_client(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value [C]`` shaped to broadcast against ``like [C, ...]``."""
    return value.view(-1, *([1] * (like.dim() - 1)))


class StackedAdamW:
    """AdamW (as ``torch.optim.AdamW``) over parameters with a leading client axis, where each
    client has its own step count and learning rate and only the ``active`` ones move."""

    def __init__(self, params: dict[str, torch.Tensor], weight_decay: float) -> None:
        self.params, self.weight_decay = params, weight_decay
        self.exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
        c = next(iter(params.values())).shape[0]
        self.steps = torch.zeros(c, device=next(iter(params.values())).device)

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], active: torch.Tensor,
             lr: torch.Tensor) -> None:
        self.steps += active
        active = active.bool()
        t = self.steps.clamp(min=1)
        step_size = lr / (1 - BETAS[0] ** t)
        correction = (1 - BETAS[1] ** t).sqrt()
        for name, p in self.params.items():
            g, m, v = grads[name], self.exp_avg[name], self.exp_avg_sq[name]
            on = _per_client(active, p)
            m_new = m.lerp(g, 1 - BETAS[0])
            v_new = v * BETAS[1] + (1 - BETAS[1]) * g * g
            p_new = p * (1 - _per_client(lr * self.weight_decay, p))
            p_new = p_new - _per_client(step_size, p) * m_new / (
                v_new.sqrt() / _per_client(correction, p) + EPS)
            p.copy_(torch.where(on, p_new, p))
            m.copy_(torch.where(on, m_new, m))
            v.copy_(torch.where(on, v_new, v))

    def load(self, c: int, names: list[str], state: dict) -> None:
        """Client ``c``'s slice from a ``torch.optim.AdamW`` state dict."""
        for i, name in enumerate(names):
            entry = state["state"][i]
            self.exp_avg[name][c] = entry["exp_avg"]
            self.exp_avg_sq[name][c] = entry["exp_avg_sq"]
            self.steps[c] = float(entry["step"])

    def export(self, c: int, names: list[str], groups: list[dict]) -> dict:
        """Client ``c``'s slice as a ``torch.optim.AdamW`` state dict."""
        step = float(self.steps[c])
        return {"state": {i: {"step": torch.tensor(step),
                              "exp_avg": self.exp_avg[name][c].clone(),
                              "exp_avg_sq": self.exp_avg_sq[name][c].clone()}
                          for i, name in enumerate(names)},
                "param_groups": [dict(g) for g in groups]}


def clip_per_client(grads: dict[str, torch.Tensor], max_norm: float) -> None:
    """Scale each client's gradients to total norm at most ``max_norm``, in place (as
    ``torch.nn.utils.clip_grad_norm_`` does for one model)."""
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads.values():
        g.mul_(_per_client(scale, g))


class Batched(Executor):
    """Trains up to ``clients_per_batch`` clients at a time as one stacked adapter; when a batch
    does not fit in device memory, halves it (with a warning) down to one client. Generators
    train as one stacked bank."""

    stack_generators = True

    def __init__(self, shared: SharedTensors, loss: AdapterLoss, model: AudioAdapter,
                 clients_per_batch: int) -> None:
        super().__init__(shared)
        self.loss, self.model = loss, model
        self.clients_per_batch = clients_per_batch
        self.names = [name for name, _ in model.named_parameters()]
        self.groups: list[dict] | None = None

    def train_adapters(self, jobs: Sequence[AdapterJob], spec: RoundSpec
                       ) -> Iterator[LocalUpdate]:
        done = 0
        while done < len(jobs):
            chunk = jobs[done : done + self.clients_per_batch]
            try:
                updates = self.train_together(chunk, spec)
            except torch.OutOfMemoryError as err:
                if len(chunk) == 1:
                    raise ResourceError(f"{chunk[0].who}: one client's adapter does not fit in "
                                        "device memory; lower adapter.batch_size or "
                                        "adapter.hidden_dim, or use device=cpu") from err
                self.clients_per_batch = max(1, len(chunk) // 2)
                log.warning("executor.clients_per_batch=%d does not fit in device memory; "
                            "going on with %d", len(chunk), self.clients_per_batch)
                if self.shared.tokens.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            done += len(chunk)
            yield from updates

    def _optimizer_groups(self, config: AdapterConfig) -> list[dict]:
        """``param_groups`` of the state dicts handed back (as torch's AdamW writes them)."""
        if self.groups is None:
            self.groups = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                            weight_decay=config.weight_decay
                                            ).state_dict()["param_groups"]
        return self.groups

    def train_together(self, jobs: Sequence[AdapterJob], spec: RoundSpec) -> list[LocalUpdate]:
        """Local training of ``jobs`` as one stacked model; their updates in job order."""
        config, device = spec.config, self.shared.tokens.device
        params = {n: torch.stack([job.start[n] for job in jobs]).to(device).requires_grad_()
                  for n in self.names}
        optimizer = StackedAdamW(params, config.weight_decay)
        for c, job in enumerate(jobs):
            if job.optimizer_state is not None:
                optimizer.load(c, self.names, job.optimizer_state)
        anchor = ({n: spec.anchor[n].unsqueeze(0) for n in self.names} if spec.proximal
                  else None)
        plan = schedule(jobs, config, spec.epochs, device)
        dtype = params[self.names[0]].dtype
        active = plan.active.to(dtype)
        sizes = torch.tensor([len(job.rows) for job in jobs], device=device)
        dropout = self.model.dropout
        epoch_loss = torch.full((len(jobs),), math.nan, device=device)
        for epoch in range(spec.epochs):
            total = torch.zeros(len(jobs), device=device)
            first = torch.zeros(len(jobs), device=device)
            for slot in range(plan.rows.shape[1]):
                rows, valid = plan.rows[epoch, slot], plan.valid[epoch, slot].to(dtype)
                on = active[epoch, slot]
                with autocast(device, config.precision):
                    latents, sequence = adapter_outputs(
                        params, self.shared.tokens[rows], self.model.num_heads, dropout,
                        plan.keys[epoch, slot] if dropout else None)
                    per_row = self.loss.per_sample(latents.mean(2), self.shared.labels[rows],
                                                   sequence)
                count = valid.sum(1)
                loss = (per_row.to(dtype) * valid).sum(1) / count.clamp(min=1)
                if anchor is not None:
                    loss = loss + spec.mu / 2 * sum(
                        (params[n] - anchor[n]).square().flatten(1).sum(1) for n in self.names)
                grads = dict(zip(self.names, torch.autograd.grad(loss.sum(), list(
                    params.values())), strict=True))
                if config.grad_clip > 0:
                    clip_per_client(grads, config.grad_clip)
                optimizer.step(grads, on, plan.lr[epoch, slot])
                first = torch.where(on.bool(), flag_nonfinite(loss, first), first)
                total += loss.detach() * count
            for c in torch.nonzero(~torch.isfinite(first)).flatten().tolist():
                check_finite(first[c], jobs[c].who, epoch + 1)
            epoch_loss = total / sizes
        groups = self._optimizer_groups(config) if spec.keep_optimizer else []
        losses = epoch_loss.tolist()
        return [LocalUpdate(job.node, {n: params[n][c].detach().clone() for n in self.names},
                            len(job.rows), losses[c],
                            optimizer.export(c, self.names, groups) if spec.keep_optimizer
                            else None)
                for c, job in enumerate(jobs)]

