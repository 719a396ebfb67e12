"""FedGen (Zhu et al. 2021): data-free knowledge distillation through a generator the server
learns and broadcasts.

The server's generator maps noise and a class to features that the round's client heads
classify as that class; each client then adds ``alpha`` times its head's loss on a generated
batch to every local step, which carries the other nodes' view of each class into its own
training. FedGen generates in the space its predictor reads. Here the predictor is the adapter's
head (the attention pooling into the text space), so the generator outputs ``tokens`` lifted
tokens in the body's output space: generating the adapter's final output instead would leave
nothing trainable to regularise, since the class prompts that score it are fixed.
"""

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from flcore.clients.protocol import (
    AdapterJob,
    LocalUpdate,
    RoundSpec,
    SharedTensors,
    StateDict,
    SyntheticBatches,
)
from flcore.config import Config, FedGenConfig
from flcore.servers.strategies import FedAvg
from flcore.streams import Purpose, stream_seed
from flcore.trainmodel.adapters import AdapterLoss, head_embed

if TYPE_CHECKING:
    from flcore.clients.clientA2V import ClientA2V


class FeatureGenerator(nn.Module):
    """Noise ``[B, noise_dim]`` and classes ``[B]`` to ``[B, tokens, width]`` lifted tokens: one
    hidden layer over the noise and the class's one-hot code, as FedGen's generator."""

    def __init__(self, config: FedGenConfig, num_classes: int, width: int) -> None:
        super().__init__()
        self.num_classes, self.tokens, self.width = num_classes, config.tokens, width
        self.net = nn.Sequential(nn.Linear(config.noise_dim + num_classes, config.hidden_dim),
                                 nn.LayerNorm(config.hidden_dim), nn.ReLU(),
                                 nn.Linear(config.hidden_dim, config.tokens * width))

    def forward(self, noise: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        code = F.one_hot(classes, self.num_classes).to(noise.dtype)
        return self.net(torch.cat([noise, code], 1)).view(-1, self.tokens, self.width)


def diversity_loss(noise: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """FedGen's diversity term ``exp(-mean_ij d(f_i, f_j) d(z_i, z_j))`` (mean absolute
    difference of the features, mean squared difference of the noises): it falls as distinct
    noises map to distinct features, so the generator does not collapse onto one per class."""
    features = features.flatten(1)
    d_features = torch.cdist(features, features, p=1) / features.shape[1]
    d_noise = torch.cdist(noise, noise).square() / noise.shape[1]
    return torch.exp(-(d_features * d_noise).mean())


class FedGen(FedAvg):
    """FedAvg whose clients are regularised by the server's generator (see the module): after
    each round's averaging the generator trains ``server_steps`` steps so that the round's
    client heads, weighted per class by each client's share of that class's clips, classify
    its features as their class."""

    def __init__(self, config: Config, shared: SharedTensors, loss: AdapterLoss) -> None:
        super().__init__(config)
        self.settings, self.seed = config.federation.fedgen, config.seed
        self.epochs, self.batch_size = config.federation.local_epochs, config.adapter.batch_size
        self.num_heads, self.shared, self.loss = config.adapter.num_heads, shared, loss
        device = shared.tokens.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(config.seed, round_=0, node=0, generator=0,
                                          purpose=Purpose.fedgen_training))
            self.generator = FeatureGenerator(self.settings, len(shared.class_names),
                                              config.adapter.hidden_dim).to(device)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(),
                                                    lr=self.settings.lr)
        self.counts = torch.zeros(len(shared.class_names), device=device)
        self.node_counts: dict[int, torch.Tensor] = {}
        self.teachers: list[tuple[torch.Tensor, StateDict]] = []
        self.rounds_trained = 0

    def begin_round(self) -> None:
        super().begin_round()
        self.teachers = []

    def class_counts(self, client: "ClientA2V") -> torch.Tensor:
        """How many training clips of each class ``client`` holds (what FedGen's clients report
        besides their weights)."""
        return torch.bincount(self.shared.labels[client.train_idx],
                              minlength=len(self.shared.class_names)).to(self.counts.dtype)

    def jobs(self, client: "ClientA2V", job: AdapterJob, global_state: StateDict,
             round_: int) -> list[AdapterJob]:
        if not self.rounds_trained or self.settings.alpha == 0:
            return [job]
        steps = self.epochs * math.ceil(len(job.rows) / self.batch_size)
        rng = torch.Generator(self.counts.device).manual_seed(stream_seed(
            self.seed, round_=round_, node=client.node, generator=0,
            purpose=Purpose.fedgen_batches))
        noise, classes = self.draw(steps * self.settings.batch_size, rng)
        self.generator.eval()
        with torch.no_grad():
            features = self.generator(noise, classes)
        shape = (steps, self.settings.batch_size)
        return [replace(job, synthetic=SyntheticBatches(
            features.view(*shape, *features.shape[1:]), classes.view(shape)))]

    def phases(self, spec: RoundSpec, global_state: StateDict) -> list[RoundSpec]:
        return [replace(spec, synthetic_weight=self.settings.alpha)]

    def draw(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` noises and classes drawn from the clips' class distribution so far."""
        classes = torch.multinomial(self.counts, n, replacement=True, generator=rng)
        noise = torch.randn(n, self.settings.noise_dim, generator=rng, device=self.counts.device)
        return noise, classes

    def accept(self, client: "ClientA2V", update: LocalUpdate) -> None:
        super().accept(client, update)
        if client.node not in self.node_counts:
            self.node_counts[client.node] = self.class_counts(client)
            self.counts = self.counts + self.node_counts[client.node]
        self.teachers.append((self.node_counts[client.node], update.state))

    def conclude(self, global_state: StateDict) -> StateDict:
        new_state = super().conclude(global_state)
        if self.teachers:
            self.train_generator()
        return new_state

    def train_generator(self) -> None:
        """``server_steps`` Adam steps of the generator against the round's client heads."""
        counts = torch.stack([c for c, _ in self.teachers])  # [K, C]
        weights = counts / counts.sum(0).clamp(min=1)
        heads = {k: torch.stack([s[k] for _, s in self.teachers]).detach()
                 for k in self.teachers[0][1]}
        rng = torch.Generator(self.counts.device).manual_seed(stream_seed(
            self.seed, round_=self.rounds_trained + 1, node=0, generator=0,
            purpose=Purpose.fedgen_training))
        self.generator.train()
        for _ in range(self.settings.server_steps):
            noise, classes = self.draw(self.settings.batch_size, rng)
            features = self.generator(noise, classes)
            k = len(self.teachers)
            pooled = head_embed(heads, features.expand(k, *features.shape), self.num_heads)
            per_row = self.loss.per_sample(pooled, classes.expand(k, -1))
            teacher = (weights[:, classes] * per_row).sum(0).mean()
            value = teacher + self.settings.diversity_weight * diversity_loss(noise, features)
            self.generator_optimizer.zero_grad(set_to_none=True)
            value.backward()
            self.generator_optimizer.step()
        self.rounds_trained += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "fedgen": {"generator": self.generator.state_dict(),
                           "optimizer": self.generator_optimizer.state_dict(),
                           "node_counts": {str(n): c for n, c in self.node_counts.items()},
                           "rounds_trained": self.rounds_trained}}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        super().load_state_dict(state, device)
        saved = state["fedgen"]
        self.generator.load_state_dict(saved["generator"])
        self.generator_optimizer.load_state_dict(saved["optimizer"])
        self.node_counts = {int(n): c.to(device) for n, c in saved["node_counts"].items()}
        self.counts = sum(self.node_counts.values(), torch.zeros_like(self.counts))
        self.rounds_trained = int(saved["rounds_trained"])
