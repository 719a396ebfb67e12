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
    """What a client sends back after local training; ``gradient_mean`` (when the round's spec
    asks for it) is the mean over its local steps of the gradients of its own loss, without
    the strategy's linear term (SCAFFOLD's new control variate)."""

    node: int
    state: StateDict
    num_samples: int
    loss: float
    optimizer_state: dict | None = None
    gradient_mean: StateDict | None = None


@dataclass(frozen=True)
class SyntheticBatches:
    """FedGen's generated batches for one client, one per local step: features in the
    adapter body's output space ``[steps, B, tokens, hidden]`` and their classes ``[steps, B]``."""

    features: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class AdapterJob:
    """One selected client's local adapter training in a round."""

    node: int
    rows: torch.Tensor
    start: StateDict
    optimizer_state: dict | None
    seed: int
    who: str
    #: Weight of the proximal term towards the round's anchor (FedProx, FedDyn, Ditto).
    mu: float = 0.0
    #: ``<w, linear>`` is added to the local loss (SCAFFOLD's ``c - c_i``, FedDyn's ``-g_i``).
    linear: StateDict | None = None
    #: FedGen's generated batches, whose adapter-head loss regularises local training.
    synthetic: SyntheticBatches | None = None
    #: Whether this trains the node's personal adapter (Ditto) rather than its shared update.
    personal: bool = False


@dataclass(frozen=True)
class PrivacySpec:
    """DP-SGD of a round's local training: per-sample clipping norm and noise multiplier."""

    max_grad_norm: float
    noise_multiplier: float


@dataclass(frozen=True)
class RoundSpec:
    """What a round's jobs share: the adapter settings, local epochs, the anchor of proximal
    terms, which parameters train (None: all), whether to report the mean gradient and the
    weight of FedGen's regulariser."""

    config: AdapterConfig
    epochs: int
    anchor: StateDict | None = None
    keep_optimizer: bool = False
    trainable: frozenset[str] | None = None
    gradient_mean: bool = False
    synthetic_weight: float = 0.0
    privacy: PrivacySpec | None = None

    def proximal(self, job: AdapterJob) -> bool:
        """Whether ``job``'s loss has a proximal term."""
        return self.anchor is not None and job.mu > 0
