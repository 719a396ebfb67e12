"""The strategies' client-side loss terms for a stack of clients: FedProx's (and Ditto's)
proximal term, SCAFFOLD's and FedDyn's linear term and FedGen's generated batches. None of them
reads a client's data, so DP-SGD adds their gradient to the private one without spending
privacy."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flcore.clients.protocol import AdapterJob, RoundSpec, SyntheticBatches
from flcore.trainmodel.adapters import AdapterLoss, Params, head_embed


@dataclass
class Terms:
    """The terms of a stack of ``C`` jobs: the anchor and per-job weights ``mu [C]`` of the
    proximal term, the linear terms ``[C, ...]`` and the FedGen batches ``[C, steps, ...]``
    with their weight (each None where no job has it)."""

    anchor: dict[str, torch.Tensor] | None
    mu: torch.Tensor
    linear: dict[str, torch.Tensor] | None
    synthetic: SyntheticBatches | None
    synthetic_weight: float

    def __bool__(self) -> bool:
        return (self.anchor is not None or self.linear is not None
                or self.synthetic is not None)

    def loss(self, params: Params, step: torch.Tensor, loss: AdapterLoss,
             num_heads: int) -> torch.Tensor:
        """Every job's terms ``[C]`` at its 0-based optimizer step ``step [C]`` (which
        generated batch; past the last, the last)."""
        c = self.mu.shape[0]
        total = torch.zeros(c, device=self.mu.device)
        if self.anchor is not None:
            total = total + self.mu / 2 * sum((params[n] - a).square().flatten(1).sum(1)
                                              for n, a in self.anchor.items())
        if self.linear is not None:
            total = total + sum((params[n] * t).flatten(1).sum(1)
                                for n, t in self.linear.items())
        if self.synthetic is not None and self.synthetic_weight > 0:
            at = step.to(self.mu.device).clamp(max=self.synthetic.labels.shape[1] - 1)
            clients = torch.arange(c, device=self.mu.device)
            pooled = head_embed(params, self.synthetic.features[clients, at], num_heads)
            total = total + self.synthetic_weight * loss.per_sample(
                pooled, self.synthetic.labels[clients, at]).mean(1)
        return total


def stack_terms(jobs: Sequence[AdapterJob], spec: RoundSpec, names: Sequence[str],
                device: torch.device) -> Terms:
    """The :class:`Terms` of ``jobs`` under ``spec``: linear terms stacked (zeros for a job
    without one), FedGen batches padded to the longest (with copies of their last)."""
    anchor = ({n: spec.anchor[n].unsqueeze(0).to(device) for n in names}
              if any(spec.proximal(job) for job in jobs) else None)
    mu = torch.tensor([job.mu for job in jobs], device=device)
    linear = None
    if any(job.linear is not None for job in jobs):
        linear = {n: torch.stack([job.start[n].new_zeros(job.start[n].shape)
                                  if job.linear is None else job.linear[n] for job in jobs]
                                 ).to(device) for n in names}
    synthetic = None
    if any(job.synthetic is not None for job in jobs):
        batches = [job.synthetic for job in jobs]
        assert all(b is not None for b in batches), "FedGen batches for every job or none"
        steps = max(len(b.labels) for b in batches)
        synthetic = SyntheticBatches(
            torch.stack([_pad(b.features, steps) for b in batches]).to(device),
            torch.stack([_pad(b.labels, steps) for b in batches]).to(device))
    return Terms(anchor, mu, linear, synthetic, spec.synthetic_weight)


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` padded along its first axis to ``length`` (with copies of its last row)."""
    return torch.cat([x, x[-1:].expand(length - len(x), *x.shape[1:])]) if len(x) < length else x
