"""A round's clients trained together as one adapter with a leading client axis.

Each client keeps what makes its training its own: its minibatch order and dropout masks (both
functions of its seed, as in :func:`~flcore.clients.training.fit`), its AdamW state and step
count, its learning-rate schedule, its gradient-norm clip and its data size (a client with fewer
minibatches sits out the steps it does not have). So the result equals the sequential
executor's to float tolerance, while a step costs a few large kernels instead of one small set
per client. The step loop makes no host round trip: non-finite losses are caught by device-side
flags that are read once an epoch (:mod:`flcore.trainmodel.optim`).
"""

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from flcore.clients.protocol import AdapterJob, LocalUpdate, RoundSpec, SharedTensors
from flcore.clients.terms import stack_terms
from flcore.clients.training import check_finite, cosine_lr, minibatch_orders
from flcore.config import AdapterConfig, LrSchedule
from flcore.errors import ResourceError
from flcore.executors.base import Executor
from flcore.privacy.training import train_private
from flcore.runtime import autocast
from flcore.trainmodel.adapters import (
    AdapterLoss,
    AudioAdapter,
    adapter_outputs,
    step_keys,
)
from flcore.trainmodel.optim import NonFiniteFlags, StackedAdam, clip_per_model

log = logging.getLogger(__name__)


@dataclass
class Schedule:
    """Every step's minibatch of every client, laid out ``[epochs, slots, clients, ...]``."""

    rows: torch.Tensor  # dataset rows, 0 where padded  [E, S, C, B]
    valid: torch.Tensor  # real rows  [E, S, C, B]
    keys: torch.Tensor  # dropout keys  [E, S, C]
    lr: torch.Tensor  # learning rates  [E, S, C]
    step: torch.Tensor  # each client's 0-based optimizer step  [E, S, C]

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
                    step_keys(seeds, step).to(device), lr.to(device, torch.get_default_dtype()),
                    step.to(device))


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
        """Local training of ``jobs`` as one stacked model (DP-SGD under ``spec.privacy``);
        their updates in job order."""
        if spec.privacy is not None:
            return train_private(self.names, self.model.num_heads, self.model.dropout,
                                 self.loss, self.shared, jobs, spec)
        config, device = spec.config, self.shared.tokens.device
        trained = [n for n in self.names if spec.trainable is None or n in spec.trainable]
        params = {n: torch.stack([job.start[n] for job in jobs]).to(device)
                  .requires_grad_(n in trained) for n in self.names}
        optimizer = StackedAdam([params[n] for n in trained], weight_decay=config.weight_decay)
        for c, job in enumerate(jobs):
            if job.optimizer_state is not None:
                optimizer.load_torch(c, job.optimizer_state)
        terms = stack_terms(jobs, spec, self.names, device)
        gradients = ({n: torch.zeros_like(params[n]) for n in trained} if spec.gradient_mean
                     else None)
        plan = schedule(jobs, config, spec.epochs, device)
        dtype = params[self.names[0]].dtype
        sizes = torch.tensor([len(job.rows) for job in jobs], device=device)
        dropout = self.model.dropout
        epoch_loss = torch.full((len(jobs),), math.nan, device=device)
        for epoch in range(spec.epochs):
            total = torch.zeros(len(jobs), device=device)
            flags = NonFiniteFlags(len(jobs), device)
            for slot in range(plan.rows.shape[1]):
                rows, valid = plan.rows[epoch, slot], plan.valid[epoch, slot].to(dtype)
                on = plan.active[epoch, slot]
                with autocast(device, config.precision):
                    latents, sequence = adapter_outputs(
                        params, self.shared.tokens[rows], self.model.num_heads, dropout,
                        plan.keys[epoch, slot] if dropout else None)
                    per_row = self.loss.per_sample(latents.mean(2), self.shared.labels[rows],
                                                   sequence)
                count = valid.sum(1)
                loss = (per_row.to(dtype) * valid).sum(1) / count.clamp(min=1)
                if terms:
                    loss = loss + terms.loss(params, plan.step[epoch, slot], self.loss,
                                             self.model.num_heads)
                grads = torch.autograd.grad(loss.sum(), [params[n] for n in trained])
                if gradients is not None:
                    for n, g in zip(trained, grads, strict=True):
                        gradients[n] += g * on.view(-1, *[1] * (g.dim() - 1)).to(g.dtype)
                if config.grad_clip > 0:
                    clip_per_model(grads, config.grad_clip, flat=True)
                optimizer.step(on, grads, plan.lr[epoch, slot])
                flags.update(loss, on)
                total += loss.detach() * count
            for c in flags.failed():
                check_finite(flags.value[c], jobs[c].who, epoch + 1)
            epoch_loss = total / sizes
        groups = self._optimizer_groups(config) if spec.keep_optimizer else []
        losses = epoch_loss.tolist()
        means = None
        if gradients is not None:
            steps = spec.epochs * torch.ceil(sizes / config.batch_size)
            means = {n: g / steps.view(-1, *[1] * (g.dim() - 1))
                     - (0 if terms.linear is None else terms.linear[n])
                     for n, g in gradients.items()}
        return [LocalUpdate(job.node, {n: params[n][c].detach().clone() for n in self.names},
                            len(job.rows), losses[c],
                            optimizer.export_torch(c, groups) if spec.keep_optimizer
                            else None,
                            None if means is None else {n: g[c] for n, g in means.items()})
                for c, job in enumerate(jobs)]
