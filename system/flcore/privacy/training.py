"""Local adapter training with DP-SGD, for one client or a stack of them (``privacy=dp``).

Each client's steps are its non-private schedule's (``ceil(n / batch_size)`` a epoch), but each
step's minibatch is Poisson-sampled: every row independently with rate ``batch_size / n``. The
per-sample gradients of the whole stack come from one ``torch.func`` pass (``vmap`` over the
samples of ``grad`` of the stacked adapter's loss), so DP keeps the batched executor's speed;
:func:`~flcore.privacy.dpsgd.private_gradients` clips, sums and noises them per client, and the
stacked AdamW steps with the result. A client's sampling and noise come from streams of its
job's seed, so it trains alike whichever clients share its stack. Dropout masks are drawn per
sample (the step's key mixed with the sample's slot).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from flcore.clients.protocol import AdapterJob, LocalUpdate, RoundSpec, SharedTensors
from flcore.clients.training import check_finite, cosine_lr
from flcore.config import LrSchedule
from flcore.privacy.dpsgd import poisson_sample, private_gradients
from flcore.streams import Purpose, stream_seed
from flcore.trainmodel.adapters import AdapterLoss, adapter_outputs, mix32, step_keys
from flcore.trainmodel.optim import StackedAdam


def sample_rate(rows: int, batch_size: int) -> float:
    """The Poisson sampling rate of a client with ``rows`` training clips."""
    return min(1.0, batch_size / rows)


def steps_per_round(rows: int, batch_size: int, epochs: int) -> int:
    """A client's DP-SGD steps in one round: its non-private schedule's."""
    return epochs * math.ceil(rows / batch_size)


def _streams(job: AdapterJob, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """The job's sampling stream (on the CPU) and noise stream (on ``device``)."""
    sampling, noise = (stream_seed(job.seed, round_=0, node=0, generator=k,
                                   purpose=Purpose.dp_sgd) for k in (0, 1))
    return (torch.Generator().manual_seed(sampling),
            torch.Generator(device).manual_seed(noise))


@dataclass
class Clients:
    """What DP-SGD keeps per client of a stack: its rows, steps an epoch, sampling rate,
    expected batch, streams and dropout seed."""

    jobs: Sequence[AdapterJob]
    batch_size: int
    device: torch.device

    def __post_init__(self) -> None:
        sizes = [len(job.rows) for job in self.jobs]
        self.per_epoch = [math.ceil(n / self.batch_size) for n in sizes]
        self.rates = [sample_rate(n, self.batch_size) for n in sizes]
        self.expected = torch.tensor([r * n for r, n in zip(self.rates, sizes, strict=True)],
                                     device=self.device)
        self.streams = [_streams(job, self.device) for job in self.jobs]
        self.seeds = torch.tensor([job.seed & 0xFFFFFFFF for job in self.jobs])

    def active(self, slot: int) -> list[bool]:
        """Which clients have a step at ``slot`` of an epoch."""
        return [slot < p for p in self.per_epoch]

    def draw(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's Poisson samples, padded: rows ``[C, width]`` and whether each is one
        ``[C, width]`` (none for a client without a step at ``slot``)."""
        picks = [job.rows[poisson_sample(len(job.rows), rate, stream[0]).to(job.rows.device)]
                 if on else job.rows[:0]
                 for job, rate, stream, on in zip(self.jobs, self.rates, self.streams,
                                                  self.active(slot), strict=True)]
        width = max(1, max(len(p) for p in picks))
        rows = torch.zeros(len(picks), width, dtype=torch.long, device=self.device)
        sampled = torch.zeros(len(picks), width, device=self.device)
        for c, pick in enumerate(picks):
            rows[c, : len(pick)] = pick.to(self.device)
            sampled[c, : len(pick)] = 1
        return rows, sampled

    def keys(self, step: torch.Tensor, width: int) -> torch.Tensor:
        """Per-sample dropout keys ``[C, width]``: the step's key mixed with the slot."""
        base = step_keys(self.seeds, step).view(-1, 1)
        return mix32(base ^ mix32(torch.arange(width).view(1, -1))).to(self.device)


def train_private(names: Sequence[str], num_heads: int, dropout: float, loss: AdapterLoss,
                  shared: SharedTensors, jobs: Sequence[AdapterJob], spec: RoundSpec
                  ) -> list[LocalUpdate]:
    """DP-SGD local training of ``jobs`` as one stack (see the module); the updates in job
    order, their ``loss`` the mean loss of the last epoch's sampled rows."""
    assert spec.privacy is not None
    config, device = spec.config, shared.tokens.device
    trained = [n for n in names if spec.trainable is None or n in spec.trainable]
    params = {n: torch.stack([job.start[n] for job in jobs]).to(device) for n in names}
    frozen = {n: params[n] for n in names if n not in trained}
    optimizer = StackedAdam([params[n] for n in trained], weight_decay=config.weight_decay)
    clients = Clients(jobs, config.batch_size, device)
    total = torch.tensor([float(spec.epochs * p) for p in clients.per_epoch])

    def one_sample(theirs: dict[str, torch.Tensor], tokens: torch.Tensor, labels: torch.Tensor,
                   keys: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        latents, sequence = adapter_outputs({**frozen, **theirs}, tokens.unsqueeze(1),
                                            num_heads, dropout, keys)
        per = loss.per_sample(latents.mean(2), labels.unsqueeze(1), sequence)
        return per.sum(), per.detach()

    per_sample = vmap(grad(one_sample, has_aux=True), in_dims=(None, 1, 1, 1))
    epoch_loss = [math.nan] * len(jobs)
    for epoch in range(spec.epochs):
        totals = torch.zeros(len(jobs), device=device)
        counts = torch.zeros(len(jobs), device=device)
        finite = torch.ones(len(jobs), dtype=torch.bool, device=device)
        for slot in range(max(clients.per_epoch)):
            active = clients.active(slot)
            rows, sampled = clients.draw(slot)
            step = torch.tensor([epoch * p + slot for p in clients.per_epoch])
            keys = clients.keys(step, rows.shape[1]) if dropout else None
            grads, per = per_sample({n: params[n] for n in trained}, shared.tokens[rows],
                                    shared.labels[rows], keys)
            per = per.squeeze(-1).T * sampled  # [C, width]
            noisy = private_gradients([grads[n].movedim(0, 1) for n in trained], sampled,
                                      spec.privacy.max_grad_norm, spec.privacy.noise_multiplier,
                                      clients.expected,
                                      [s[1] if on else None
                                       for s, on in zip(clients.streams, active, strict=True)])
            lr = (cosine_lr(config.lr, step.double(), total)
                  if config.lr_schedule is LrSchedule.cosine
                  else torch.full((len(jobs),), config.lr, dtype=torch.float64))
            optimizer.step(torch.tensor(active, device=device), noisy,
                           lr.to(device, params[names[0]].dtype))
            totals += per.sum(1)
            counts += sampled.sum(1)
            finite &= torch.isfinite(per).all(1)
        for c, job in enumerate(jobs):
            check_finite(torch.where(finite[c], 0.0, math.nan), job.who, epoch + 1)
        epoch_loss = (totals / counts.clamp(min=1)).tolist()
    return [LocalUpdate(job.node, {n: params[n][c].detach().clone() for n in names},
                        len(job.rows), epoch_loss[c]) for c, job in enumerate(jobs)]
