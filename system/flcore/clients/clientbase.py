"""State and training loop every client shares.

A client is a node's view of the federation's cached embeddings: index tensors into one shared
token tensor on the run's device, so an idle client costs a few index tensors, not a model.
Clients of stateful algorithms (``local``, ``centralized``) also keep their model and optimizer
state between rounds.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flcore.config import AdapterConfig, LrSchedule
from flcore.errors import TrainingError

StateDict = dict[str, torch.Tensor]


@dataclass
class SharedTensors:
    """Cached embeddings on the run's device; every client indexes into them."""

    tokens: torch.Tensor
    labels: torch.Tensor
    prompts: torch.Tensor
    label_space: torch.Tensor
    class_names: list[str]


@dataclass
class LocalUpdate:
    """What a client sends back after local training."""

    node: int
    state: StateDict
    num_samples: int
    loss: float


def training_seed(seed: int, round_: int, node: int) -> int:
    """The seed of one client's local training: a pure function of (run seed, round, node), so a
    resumed run or another executor draws the same minibatches and dropout masks."""
    return (seed * 1_000_003 + round_ * 10_007 + node + 1) % 2**63


def proximal_term(model: nn.Module, anchor: StateDict, mu: float) -> torch.Tensor:
    """FedProx's ``mu / 2 * ||w - w_global||^2`` over the model's parameters."""
    return mu / 2 * sum(((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters())


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and the device's, for dropout masks. ``torch.manual_seed`` would
    also queue lazy seeding of every absent accelerator, with a stack capture each time (about
    1 ms per call on a CPU-only machine)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


StepLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def fit(model: nn.Module, step_loss: StepLoss, features: torch.Tensor, labels: torch.Tensor,
        config: AdapterConfig, epochs: int, seed: int, who: str,
        optimizer_state: dict | None = None) -> tuple[float, dict]:
    """Train ``model`` in place with AdamW on seeded minibatches of ``features``; return the last
    epoch's mean loss and the optimizer state. ``seed`` fixes the minibatch order and dropout
    masks. Raises TrainingError naming ``who`` and the epoch on a NaN or infinite loss."""
    seed_torch(seed, features.device)
    shuffle = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    n = features.shape[0]
    steps = epochs * math.ceil(n / config.batch_size)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
                if config.lr_schedule is LrSchedule.cosine else None)
    model.train()
    epoch_loss = math.nan
    for epoch in range(epochs):
        order = torch.randperm(n, generator=shuffle).to(features.device)
        total = torch.zeros((), device=features.device)
        for start in range(0, n, config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = step_loss(model, features[batch], labels[batch])
            if not torch.isfinite(loss):
                raise TrainingError(f"{who}, epoch {epoch + 1}: adapter loss is {loss.item()}; "
                                    "lower adapter.lr or set adapter.grad_clip")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if schedule is not None:
                schedule.step()
            total += loss.detach() * len(batch)
        epoch_loss = (total / n).item()
    return epoch_loss, optimizer.state_dict()


class ClientBase:
    """A node: its clips (index tensors per split) and, if stateful, its model and optimizer."""

    def __init__(self, node: int, classes: list[str], train: torch.Tensor, val: torch.Tensor,
                 test: torch.Tensor) -> None:
        self.node, self.classes = node, classes
        self.train_idx, self.val_idx, self.test_idx = train, val, test
        self.model_state: StateDict | None = None
        self.optimizer_state: dict | None = None

    @property
    def num_train(self) -> int:
        return len(self.train_idx)

    def fit(self, model: nn.Module, step_loss: StepLoss, features: torch.Tensor,
            labels: torch.Tensor, config: AdapterConfig, epochs: int, round_: int, seed: int,
            keep_optimizer: bool) -> float:
        """Local training (see :func:`fit`) seeded by (seed, round, node); a stateful client
        keeps its optimizer state between rounds."""
        loss, state = fit(model, step_loss, features, labels, config, epochs,
                          training_seed(seed, round_, self.node),
                          f"node {self.node}, round {round_}",
                          self.optimizer_state if keep_optimizer else None)
        if keep_optimizer:
            self.optimizer_state = state
        return loss
