"""Local adapter training with DP-SGD, for one client or a stack of them (``privacy=dp``).

Each client's steps are its non-private schedule's (``ceil(n / batch_size)`` a epoch), but each
step's minibatch is Poisson-sampled: every row independently with rate ``batch_size / n``.
No per-sample gradient is ever built (ghost clipping, Li et al. 2022): the forward pass records
each affine map (:class:`~flcore.trainmodel.adapters.Taped`), one backward pass gives the
gradient at each map's output for every sample at once, a sample's norm follows from those and
the map's inputs (:func:`sample_norms`; for a linear map over a sequence ``sum_ts (a_t .
a_s)(g_t . g_s)``), and the clipped sum of a map's weights is one ``einsum`` of its inputs and
the gradients scaled by each sample's clipping factor (:func:`weighted_sums`).
:func:`~flcore.privacy.dpsgd.noisy_mean` noises it per client, and the stacked AdamW steps with
the result plus the gradient of the strategy's terms (:mod:`flcore.clients.terms`: they read
no data, so they cost no privacy). A client's sampling and noise come from streams of its job's
seed, so it trains alike whichever clients share its stack. Dropout masks are drawn per sample
(the step's key mixed with the sample's slot).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flcore.clients.protocol import AdapterJob, LocalUpdate, RoundSpec, SharedTensors
from flcore.clients.terms import stack_terms
from flcore.clients.training import check_finite, cosine_lr
from flcore.config import LrSchedule
from flcore.privacy.accounting import use
from flcore.privacy.dpsgd import noisy_mean, poisson_sample
from flcore.streams import Purpose, stream_seed
from flcore.trainmodel.adapters import AdapterLoss, Tape, adapter_outputs, mix32, step_keys
from flcore.trainmodel.optim import StackedAdam


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
        uses = [use(n, self.batch_size, 1) for n in sizes]
        self.per_epoch = [u.steps for u in uses]
        self.rates = [u.rate for u in uses]
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


def sample_norms(tape: Tape, at: dict[str, torch.Tensor], trained: set[str]) -> torch.Tensor:
    """Each sample's gradient norm ``[C, B]`` over the ``trained`` parameters, from the taped
    maps and the per-sample gradients ``at`` their outputs ``[C, B, T, out]``."""
    squared = torch.zeros(at[next(iter(at))].shape[:2], device=at[next(iter(at))].device)
    for key, e in tape.items():
        g = at[key]
        if e.bias in trained:
            squared += (g.square().sum((2, 3)) if e.kind == "shift"
                        else g.sum(2).square().sum(-1))
        if e.weight in trained:
            assert e.input is not None
            if e.kind == "scale":
                squared += (e.input * g).sum(2).square().sum(-1)
            else:
                a = e.input if e.input.dim() == g.dim() else e.input.unsqueeze(1)
                squared += ((a @ a.transpose(-1, -2)) * (g @ g.transpose(-1, -2))).sum((2, 3))
        if e.source in trained:
            assert e.weight_value is not None
            squared += (g @ e.weight_value.unsqueeze(1)).square().sum((2, 3))
    return squared.sqrt()


def clipped_sums(params: dict[str, torch.Tensor], trained: Sequence[str], tokens: torch.Tensor,
                 labels: torch.Tensor, sampled: torch.Tensor, keys: torch.Tensor | None,
                 loss: AdapterLoss, num_heads: int, dropout: float, max_norm: float
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each client's sum ``[C, ...]`` (for each ``trained`` parameter, which must require
    grad) over its ``sampled [C, B]`` rows of ``tokens [C, B, L, Da]`` of their loss gradients,
    each clipped to norm ``max_norm``; and every sampled row's loss ``[C, B]`` (0 elsewhere)."""
    tape: Tape = {}
    latents, sequence = adapter_outputs(params, tokens, num_heads, dropout, keys, tape)
    per = torch.where(sampled.bool(), loss.per_sample(latents.mean(2), labels, sequence), 0.0)
    tape = {k: e for k, e in tape.items() if e.output.requires_grad}  # no frozen-only maps
    at = torch.autograd.grad(per.sum(), [e.output for e in tape.values()])
    norms = sample_norms(tape, dict(zip(tape, at, strict=True)), set(trained))
    scale = ((max_norm / (norms + 1e-6)).clamp(max=1.0) * sampled).detach()
    summed = weighted_sums(tape, dict(zip(tape, at, strict=True)), scale, params, set(trained))
    return [summed[n] for n in trained], per.detach()


def weighted_sums(tape: Tape, at: dict[str, torch.Tensor], scale: torch.Tensor,
                  params: dict[str, torch.Tensor], trained: set[str]
                  ) -> dict[str, torch.Tensor]:
    """Each ``trained`` parameter's sum ``[C, ...]`` over the samples of their gradients
    weighted by ``scale [C, B]``, from the taped maps and the per-sample gradients ``at``
    their outputs: the gradient a backward pass of ``sum(scale * loss)`` would give, without
    the pass."""
    out = {n: torch.zeros_like(params[n]) for n in trained}
    for key, e in tape.items():
        g = at[key]
        if e.bias in trained:
            out[e.bias] += (torch.einsum("cb,cbtd->ctd", scale, g) if e.kind == "shift"
                            else torch.einsum("cb,cbto->co", scale, g))
        if e.weight in trained:
            assert e.input is not None
            if e.kind == "scale":
                out[e.weight] += torch.einsum("cb,cbtd,cbtd->cd", scale, e.input, g)
            else:
                a = e.input if e.input.dim() == g.dim() else e.input.unsqueeze(1)
                a = a.expand(*g.shape[:3], a.shape[-1])
                grad = torch.einsum("cb,cbto,cbti->coi", scale, g, a)
                if e.part is None:
                    out[e.weight] += grad
                else:
                    out[e.weight].narrow(1, e.part * grad.shape[1], grad.shape[1]).add_(grad)
        if e.source in trained:
            assert e.weight_value is not None
            out[e.source] += torch.einsum("cb,cbto,coi->cti", scale, g, e.weight_value)
    return out


def train_private(names: Sequence[str], num_heads: int, dropout: float, loss: AdapterLoss,
                  shared: SharedTensors, jobs: Sequence[AdapterJob], spec: RoundSpec
                  ) -> list[LocalUpdate]:
    """DP-SGD local training of ``jobs`` as one stack (see the module); the updates in job
    order, their ``loss`` the mean loss of the last epoch's sampled rows."""
    assert spec.privacy is not None
    config, device = spec.config, shared.tokens.device
    max_norm = spec.privacy.max_grad_norm
    trained = [n for n in names if spec.trainable is None or n in spec.trainable]
    params = {n: torch.stack([job.start[n] for job in jobs]).to(device) for n in names}
    for n in trained:
        params[n].requires_grad_(True)
    optimizer = StackedAdam([params[n] for n in trained], weight_decay=config.weight_decay)
    clients = Clients(jobs, config.batch_size, device)
    total = torch.tensor([float(spec.epochs * p) for p in clients.per_epoch])
    terms = stack_terms(jobs, spec, names, device)
    gradients = ({n: torch.zeros_like(params[n]) for n in trained} if spec.gradient_mean
                 else None)
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
            summed, per = clipped_sums(params, trained, shared.tokens[rows],
                                       shared.labels[rows], sampled, keys, loss, num_heads,
                                       dropout, max_norm)
            noisy = noisy_mean(summed, max_norm, spec.privacy.noise_multiplier,
                               clients.expected,
                               [s[1] if on else None
                                for s, on in zip(clients.streams, active, strict=True)])
            if terms:
                public = torch.autograd.grad(terms.loss(params, step, loss, num_heads).sum(),
                                             [params[n] for n in trained], allow_unused=True)
                noisy = [a if b is None else a + b for a, b in zip(noisy, public, strict=True)]
            on = torch.tensor(active, device=device)
            if gradients is not None:
                for n, g in zip(trained, noisy, strict=True):
                    gradients[n] += g * on.view(-1, *[1] * (g.dim() - 1)).to(g.dtype)
            lr = (cosine_lr(config.lr, step.double(), total)
                  if config.lr_schedule is LrSchedule.cosine
                  else torch.full((len(jobs),), config.lr, dtype=torch.float64))
            optimizer.step(on, noisy,
                           lr.to(device, params[names[0]].dtype))
            totals += per.sum(1)
            counts += sampled.sum(1)
            finite &= torch.isfinite(per).all(1)
        for c, job in enumerate(jobs):
            check_finite(torch.where(finite[c], 0.0, math.nan), job.who, epoch + 1)
        epoch_loss = (totals / counts.clamp(min=1)).tolist()
    means = None
    if gradients is not None:
        steps = total.to(device)
        means = {n: g / steps.view(-1, *[1] * (g.dim() - 1)).to(g.dtype)
                 - (0 if terms.linear is None else terms.linear[n])
                 for n, g in gradients.items()}
    return [LocalUpdate(job.node, {n: params[n][c].detach().clone() for n in names},
                        len(job.rows), epoch_loss[c], None,
                        None if means is None else {n: g[c] for n, g in means.items()})
            for c, job in enumerate(jobs)]
