"""The local training loop every executor reproduces: seeded minibatches and dropout masks,
AdamW, the strategies' extra terms (proximal, linear, FedGen's), per-epoch NaN checks without a
host round trip per step."""

import copy
import math
from collections.abc import Callable, Collection

import torch
from torch import nn

from flcore.clients.protocol import SharedTensors, StateDict
from flcore.config import AdapterConfig, LrSchedule
from flcore.errors import TrainingError
from flcore.progress import phase
from flcore.runtime import autocast
from flcore.streams import Purpose, stream_seed
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter, step_keys


def build_adapter(shared: SharedTensors, config: AdapterConfig) -> AudioAdapter:
    """An adapter into the text space of ``shared``'s prompts, with a sequence head (started at
    the label space's mean sequence) when the prompts come with token sequences."""
    sequence = shared.sequence
    model = AudioAdapter(shared.tokens.shape[-1], shared.prompts.shape[-1], config,
                         None if sequence is None else tuple(sequence.shape[1:]))
    if sequence is not None:
        model.set_sequence_base(sequence[shared.label_space].cpu())
    return model.to(shared.tokens.device)


def build_adapter_loss(shared: SharedTensors, config: AdapterConfig) -> AdapterLoss:
    """The adapter loss against ``shared``'s class prompts (and token sequences)."""
    return AdapterLoss(config, shared.prompts, shared.label_space, shared.sequence)


def training_seed(seed: int, round_: int, node: int) -> int:
    """The seed of one client's local adapter training: the stream of (run seed, round, node)
    (:func:`~flcore.streams.stream_seed`), so a resumed run or another executor draws the same
    minibatches and dropout masks, and no other node, generator or purpose shares it."""
    return stream_seed(seed, round_=round_, node=node, generator=0,
                       purpose=Purpose.adapter_training)


def proximal_term(model: nn.Module, anchor: StateDict, mu: float) -> torch.Tensor:
    """FedProx's ``mu / 2 * ||w - w_global||^2`` over the model's parameters."""
    return mu / 2 * sum(((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters())


def linear_term(model: nn.Module, linear: StateDict) -> torch.Tensor:
    """``<w, linear>`` over the model's parameters: its gradient adds ``linear`` to every
    step's gradient (SCAFFOLD's correction, FedDyn's linear penalty)."""
    return sum((p * linear[name]).sum() for name, p in model.named_parameters())


#: ``step_loss(model, x, y, key, step)``: one minibatch's loss; ``key`` seeds dropout, ``step``
#: is the 0-based optimizer step (which FedGen's generated batch to use).
StepLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def minibatch_orders(n: int, epochs: int, seed: int) -> torch.Tensor:
    """Each epoch's shuffled order of ``n`` rows ``[epochs, n]``, seeded by ``seed`` alone, so
    every executor draws a client's minibatches alike."""
    shuffle = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=shuffle) for _ in range(epochs)])


def cosine_lr(lr: float, step: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Cosine annealing from ``lr`` to 0 over ``total`` steps, at (0-based) ``step``."""
    return lr * (1 + torch.cos(torch.pi * step / total)) / 2


def flag_nonfinite(loss: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``first`` (NaN-free until a step's loss is not finite) updated by ``loss``: it keeps the
    first non-finite loss per client, on the device, with no host round trip."""
    return torch.where(torch.isfinite(first) & ~torch.isfinite(loss), loss.detach(), first)


def check_finite(first: torch.Tensor, who: str, epoch: int) -> None:
    """Raise TrainingError naming ``who`` and ``epoch`` if :func:`flag_nonfinite` caught a loss
    this epoch (one host round trip an epoch, none a step)."""
    value = first.item()
    if not math.isfinite(value):
        raise TrainingError(f"{who}, epoch {epoch}: adapter loss is {value}; lower "
                            "adapter.lr or set adapter.grad_clip")


def fit(model: nn.Module, step_loss: StepLoss, features: torch.Tensor, labels: torch.Tensor,
        config: AdapterConfig, epochs: int, seed: int, who: str,
        optimizer_state: dict | None = None, progress: str | None = None,
        trainable: Collection[str] | None = None,
        gradient_sum: StateDict | None = None) -> tuple[float, dict]:
    """Train ``model`` in place with AdamW on seeded minibatches of ``features``; return the last
    epoch's mean loss and the optimizer state. ``seed`` fixes the minibatch order and dropout
    masks (``step_loss`` passes ``key`` on to the adapter). Only the parameters named in
    ``trainable`` (default: all) are stepped and clipped; ``gradient_sum``, when given, gathers
    the sum of every step's unclipped gradients. Raises TrainingError naming ``who`` and the
    epoch on a NaN or infinite loss. ``progress`` names a per-epoch bar (on a terminal)."""
    device = features.device
    named = [(n, p) for n, p in model.named_parameters() if trainable is None or n in trainable]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if optimizer_state is not None:
        # A copy: torch's loaded optimizer would advance the caller's step counters in place.
        optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        for group in optimizer.param_groups:
            group["lr"] = config.lr  # each round's schedule starts again from adapter.lr
    n = features.shape[0]
    per_epoch = math.ceil(n / config.batch_size)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * per_epoch)
                if config.lr_schedule is LrSchedule.cosine else None)
    orders = minibatch_orders(n, epochs, seed).to(device)
    keys = (step_keys(seed, torch.arange(epochs * per_epoch)).to(device) if config.dropout > 0
            else torch.zeros(epochs * per_epoch, dtype=torch.long, device=device))
    model.train()
    epoch_loss = math.nan
    for epoch in range(epochs) if progress is None else phase(range(epochs), progress, "epoch"):
        total = torch.zeros((), device=device)
        first = torch.zeros((), device=device)
        for b, start in enumerate(range(0, n, config.batch_size)):
            batch = orders[epoch, start : start + config.batch_size]
            step = epoch * per_epoch + b
            with autocast(device, config.precision):
                loss = step_loss(model, features[batch], labels[batch], keys[step : step + 1],
                                 step)
            first = flag_nonfinite(loss, first)
            model.zero_grad(set_to_none=True)
            loss.backward()
            if gradient_sum is not None:
                for name, p in named:
                    gradient_sum[name] += p.grad
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if schedule is not None:
                schedule.step()
            total += loss.detach() * len(batch)
        check_finite(first, who, epoch + 1)
        epoch_loss = (total / n).item()
    return epoch_loss, optimizer.state_dict()
