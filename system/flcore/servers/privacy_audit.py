"""Membership-inference audits of what leaves a node (``eval.privacy_every``).

For each node, members are its training clips and non-members its validation and test clips,
of the same classes, which no model trains on; the two sets are balanced (the larger one
subsampled, seeded) and each attack scores every clip, higher meaning "more likely a member".
The attacks, each reported as ``privacy/mia/<attack>/{auc, tpr@1%fpr, tpr@0.1%fpr}``
(:mod:`flcore.metrics.membership`) per node and averaged over nodes:

- ``adapter_global``, ``adapter_node``: the loss attack (Yeom et al. 2018), minus the adapter
  loss of the clip, on the global adapter and on the node's own (its personal adapter, or the
  update it sent last);
- ``synthetic``: minus the distance of the clip's generator row to the closest synthetic sample
  of its class the node shared (the server's view under ``generator.share=samples``);
- ``generator``: minus the reconstruction error through the node's VAE (encoder mean, then
  decoder), a white-box attack on the whole generator (Hilprecht et al. 2019): what an
  auditor holding the node's generator could learn, an upper bound for what it shares;
- ``decoder`` (with ``generator.share=decoder``): minus the smallest reconstruction error over
  latents optimised through the decoder alone (GAN-Leaks' white-box attack, Chen et al.
  2020), what the server holding the shared decoder can do.
"""

from collections.abc import Callable, Iterator

import numpy as np
import torch

from flcore.clients.clientA2V import ClientA2V
from flcore.clients.protocol import SharedTensors, StateDict
from flcore.config import Config, ShareMode, TrainingData
from flcore.metrics.membership import attack_report, balance
from flcore.streams import Purpose, stream_seed
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter
from flcore.trainmodel.generators import GeneratorBank, generator_rows, slice_generator
from flcore.trainmodel.vae import VAEGenerator

Scores = Callable[[ClientA2V, torch.Tensor], torch.Tensor | None]


@torch.no_grad()
def adapter_loss_scores(model: AudioAdapter, state: StateDict, loss: AdapterLoss,
                        shared: SharedTensors, idx: torch.Tensor) -> torch.Tensor:
    """Minus each clip's adapter loss under ``state`` (the loss attack)."""
    model.load_state_dict(state)
    model.eval()
    pooled, sequence = model.outputs(shared.tokens[idx])
    return -loss.per_sample(pooled, shared.labels[idx], sequence)


def nearest_sample_scores(rows: torch.Tensor, labels: torch.Tensor, samples: torch.Tensor,
                          sample_labels: torch.Tensor) -> torch.Tensor:
    """Minus each row's distance to the closest sample of its class (of any class where its
    class has none)."""
    scores = torch.empty(len(rows), dtype=torch.float64, device=rows.device)
    for c in labels.unique().tolist():
        mine = labels == c
        pool = samples[sample_labels == c]
        pool = pool if len(pool) else samples
        scores[mine] = -torch.cdist(rows[mine].double(), pool.double()).min(1).values
    return scores


def _generator_of(bank: GeneratorBank, c: int) -> int | None:
    return next((g for g, classes in enumerate(bank.spec.classes)
                 if c in classes and bank.spec.names[g] not in bank.dropped), None)


def _per_class(bank: GeneratorBank, rows: torch.Tensor, labels: torch.Tensor,
               prompts: torch.Tensor
               ) -> Iterator[tuple[torch.Tensor, VAEGenerator, torch.Tensor,
                               torch.Tensor | None]]:
    """For each class the bank has a generator of: which rows are of it, that generator, the
    rows ``[1, n, features]`` and their condition (None for an unconditional generator)."""
    for c in labels.unique().tolist():
        g = _generator_of(bank, c)
        if g is None:
            continue
        one, mine = slice_generator(bank.model, g), labels == c
        x = rows[mine].unsqueeze(0)
        yield mine, one, x, prompts[c].expand(1, x.shape[1], -1) if one.cond else None


@torch.no_grad()
def reconstruction_scores(bank: GeneratorBank, rows: torch.Tensor, labels: torch.Tensor,
                          prompts: torch.Tensor) -> torch.Tensor:
    """Minus each row's squared reconstruction error through its class's VAE: encoder mean,
    then decoder mean (0 for a class the bank has no generator of)."""
    scores = torch.zeros(len(rows), dtype=torch.float64, device=rows.device)
    for mine, one, x, cond in _per_class(bank, rows, labels, prompts):
        mu, _ = one.encode(x, cond)
        scores[mine] = -(one.decode(mu, cond) - x).square().sum(-1)[0].double()
    return scores


def latent_search_scores(bank: GeneratorBank, rows: torch.Tensor, labels: torch.Tensor,
                         prompts: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """Minus each row's smallest squared error ``||dec(z) - x||^2`` over latents ``z``
    optimised by Adam from the prior's mean, through the decoder alone."""
    scores = torch.zeros(len(rows), dtype=torch.float64, device=rows.device)
    for mine, one, x, cond in _per_class(bank, rows, labels, prompts):
        for p in one.parameters():
            p.requires_grad_(False)
        z = torch.zeros(1, x.shape[1], one.latent, device=x.device, requires_grad=True)
        optimizer = torch.optim.Adam([z], lr=0.05)
        for _ in range(steps):
            error = (one.decode(z, cond) - x).square().sum(-1)
            optimizer.zero_grad(set_to_none=True)
            error.sum().backward()
            optimizer.step()
        with torch.no_grad():
            scores[mine] = -(one.decode(z, cond) - x).square().sum(-1)[0].double()
    return scores


class PrivacyAuditor:
    """Runs the attacks of the module on every node with members and non-members."""

    def __init__(self, config: Config, shared: SharedTensors, clients: list[ClientA2V],
                 model: AudioAdapter, loss: AdapterLoss) -> None:
        self.config, self.shared, self.clients = config, shared, clients
        self.model, self.loss = model, loss

    def candidates(self, client: ClientA2V, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The node's balanced members (training clips) and non-members (its val and test
        clips), drawn by a stream of (seed, round, node)."""
        rng = torch.Generator().manual_seed(stream_seed(
            self.config.seed, round_=round_, node=client.node, generator=0,
            purpose=Purpose.privacy_audit))
        return balance(client.train_idx, torch.cat([client.val_idx, client.test_idx]), rng)

    def generator_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The rows the generators model for clips ``idx`` (for ``training_data=adapter_output``
        the global adapter's outputs: the node's own adapter of that round is not kept)."""
        g = self.config.generator
        source = self.shared.tokens[idx]
        if g.training_data is TrainingData.adapter_output:
            self.model.eval()
            with torch.no_grad():
                source = self.model(source)
        return generator_rows(source, g.sequence_length)

    def attacks(self, global_state: StateDict, node_states: dict[int, StateDict],
                received: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Scores]:
        """The attacks that apply to this run, as functions of (node, clips) to scores (None
        where a node has nothing to attack)."""
        shared, prompts = self.shared, self.shared.prompts

        def adapter_global(client: ClientA2V, idx: torch.Tensor) -> torch.Tensor:
            return adapter_loss_scores(self.model, global_state, self.loss, shared, idx)

        def adapter_node(client: ClientA2V, idx: torch.Tensor) -> torch.Tensor | None:
            state = node_states.get(client.node)
            return (None if state is None else
                    adapter_loss_scores(self.model, state, self.loss, shared, idx))

        def synthetic(client: ClientA2V, idx: torch.Tensor) -> torch.Tensor | None:
            if client.node not in received or not len(received[client.node][0]):
                return None
            self.model.load_state_dict(global_state)
            x, y = received[client.node]
            return nearest_sample_scores(self.generator_rows(idx), shared.labels[idx],
                                         x.flatten(1), y)

        def generator(client: ClientA2V, idx: torch.Tensor) -> torch.Tensor | None:
            if not isinstance(client.generators, GeneratorBank):
                return None
            self.model.load_state_dict(global_state)
            return reconstruction_scores(client.generators, self.generator_rows(idx),
                                         shared.labels[idx], prompts)

        def decoder(client: ClientA2V, idx: torch.Tensor) -> torch.Tensor | None:
            if not isinstance(client.generators, GeneratorBank):
                return None
            self.model.load_state_dict(global_state)
            with torch.enable_grad():
                return latent_search_scores(client.generators, self.generator_rows(idx),
                                            shared.labels[idx], prompts)

        found: dict[str, Scores] = {"adapter_global": adapter_global}
        if node_states:
            found["adapter_node"] = adapter_node
        if self.config.generator.enabled:
            found["synthetic"] = synthetic
            found["generator"] = generator
            if self.config.generator.share is ShareMode.decoder:
                found["decoder"] = decoder
        return found

    def run(self, round_: int, global_state: StateDict, node_states: dict[int, StateDict],
            received: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Every attack on every node: ``privacy/mia/<attack>/node{i}/auc`` and, over the nodes,
        the mean of each measure and the total set sizes."""
        metrics: dict[str, float] = {}
        for name, attack in self.attacks(global_state, node_states, received).items():
            reports = {}
            for client in self.clients:
                members, nonmembers = self.candidates(client, round_)
                if not len(members):
                    continue
                inside, outside = attack(client, members), attack(client, nonmembers)
                if inside is None or outside is None:
                    continue
                reports[client.node] = attack_report(inside, outside)
            if not reports:
                continue
            prefix = f"privacy/mia/{name}"
            for node, report in reports.items():
                metrics[f"{prefix}/node{node}/auc"] = report["auc"]
            for key in next(iter(reports.values())):
                values = [r[key] for r in reports.values()]
                metrics[f"{prefix}/{key}"] = (float(np.sum(values)) if key.endswith("members")
                                              else float(np.mean(values)))
        self.model.load_state_dict(global_state)
        return metrics
