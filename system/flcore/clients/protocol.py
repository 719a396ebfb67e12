"""What clients, executors and the server exchange: the shared embeddings a client indexes,
one client's job for a round, what the round's jobs share, and the update a client sends back."""

from dataclasses import dataclass

import torch

from flcore.config import AdapterConfig

StateDict = dict[str, torch.Tensor]


@dataclass
class SharedTensors:
    """Cached embeddings on the run's device; every client indexes into them."""

    tokens: torch.Tensor
    labels: torch.Tensor
    prompts: torch.Tensor
    label_space: torch.Tensor
    class_names: list[str]
    #: ``[C, T, Ds]`` token-sequence conditioning of each class prompt (``output=sequence``):
    #: the target of the adapter's sequence head.
    sequence: torch.Tensor | None = None
    #: ``[C, Dp]`` unnormalised pooled conditioning (Flux's CLIP output).
    pooled_raw: torch.Tensor | None = None


@dataclass
class LocalUpdate:
    """What a client sends back after local training."""

    node: int
    state: StateDict
    num_samples: int
    loss: float
    optimizer_state: dict | None = None


@dataclass(frozen=True)
class AdapterJob:
    """One selected client's local adapter training in a round."""

    node: int
    rows: torch.Tensor
    start: StateDict
    optimizer_state: dict | None
    seed: int
    who: str


@dataclass(frozen=True)
class RoundSpec:
    """What a round's jobs share: the adapter settings, local epochs and FedProx's anchor."""

    config: AdapterConfig
    epochs: int
    anchor: StateDict | None = None
    mu: float = 0.0
    keep_optimizer: bool = False

    @property
    def proximal(self) -> bool:
        return self.anchor is not None and self.mu > 0
