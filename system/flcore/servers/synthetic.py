"""The server's synthetic learner: the nodes' synthetic samples, the pool built from them (through
server generators or not), and fine-tuning, curation and distillation on that pool."""

import logging
from typing import Any, Protocol

import torch

from flcore.clients.clientA2V import ClientA2V, condition_width
from flcore.clients.protocol import SharedTensors, StateDict
from flcore.clients.training import fit, proximal_term
from flcore.config import Config, Granularity, ServerGranularity, TrainingData
from flcore.metrics.classification import zero_shot_scores
from flcore.servers.evaluation import Evaluator
from flcore.servers.states import bank_state, clone_state
from flcore.streams import Purpose, stream, stream_seed
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter
from flcore.trainmodel.banks import Bank, bank_features, bank_from_decoder, new_bank
from flcore.trainmodel.generators import GeneratorBank, SyntheticShare, generator_spec
from flcore.trainmodel.vae import vae_loss

log = logging.getLogger(__name__)

Samples = tuple[torch.Tensor, torch.Tensor]  # rows [m, S, D] and dataset class ids [m]
Teacher = tuple[list[str], StateDict]  # the classes a node holds and its adapter state


def labels_by_centroid(bank: Bank | None) -> bool:
    """Whether ``bank`` labels its draws by the nearest class centroid: an unconditional VAE
    with a generator of several classes (``generator.conditional=false``)."""
    return (isinstance(bank, GeneratorBank) and bank.model.cond == 0
            and any(len(c) > 1 for c in bank.spec.classes))


class PoolLearning(Protocol):
    """How the round's strategy uses the pool for the global adapter (see strategies.py)."""

    global_is_synthetic_only: bool

    def learn(self, global_state: StateDict, round_: int, x: torch.Tensor, y: torch.Tensor
              ) -> tuple[StateDict, dict[str, float]]: ...


class SyntheticLearner:
    """Holds the samples each node sent last (``received``), the round's pool, the server's
    generators and the synthetic-only adapter (``tstr_state``); trains adapter states on the
    pool in the server's adapter module ``model``."""

    def __init__(self, config: Config, shared: SharedTensors, clients: list[ClientA2V],
                 model: AudioAdapter, loss: AdapterLoss, evaluator: Evaluator,
                 global_state: StateDict) -> None:
        self.config, self.shared, self.clients = config, shared, clients
        self.model, self.loss, self.evaluator = model, loss, evaluator
        g = config.generator
        self.received: dict[int, Samples] = {}
        self.pool: Samples | None = None
        self.tstr_state = (clone_state(global_state) if g.enabled and
                           g.training_data is TrainingData.audio else None)
        self.server_bank: Bank | None = None
        self.majority_shares: dict[str, float] = {}

    def receive(self, share: SyntheticShare) -> Samples:
        """A node's synthetic samples ``[m, S, D]``: as sent, or drawn from its decoders."""
        g = self.config.generator
        if share.decoder is None:
            x, y = share.x, share.y
        else:
            bank = bank_from_decoder(share.decoder, g, self.shared.tokens.device)
            prompts = self.shared.prompts if bank.model.cond else None
            x, y = bank.sample(share.counts, prompts, {}, share.rng)
        width = (self.shared.prompts.shape[-1] if g.training_data is TrainingData.adapter_output
                 else self.shared.tokens.shape[-1])
        return x.reshape(len(x), g.sequence_length, width), y

    def accept_share(self, node: int, share: SyntheticShare, centroid_labelled: bool) -> None:
        """Keep what ``node`` shared as its latest samples (none kept when it sent none)."""
        x, y = self.receive(share)
        if centroid_labelled:
            self.report_label_shares(f"node{node}", y)
        if len(x):
            self.received[node] = (x, y)
        else:
            self.received.pop(node, None)

    def report_label_shares(self, who: str, y: torch.Tensor) -> None:
        """Log the share per class of the centroid-labelled draws ``y`` of ``who``; a collapsed
        generator puts nearly all in one class. The largest becomes ``majority_shares[who]``."""
        counts = torch.bincount(y, minlength=len(self.shared.class_names)).double()
        shares = counts / counts.sum().clamp(min=1)
        self.majority_shares[who] = float(shares.max())
        log.info("%s: share of centroid-labelled draws per class: %s", who, ", ".join(
            f"{self.shared.class_names[c]} {shares[c]:.2f}" for c in y.unique().tolist()))

    def majority_metrics(self) -> dict[str, float]:
        """``{who}/synthetic/majority_share`` of every node and the server reported so far."""
        return {f"{who}/synthetic/majority_share": v for who, v in self.majority_shares.items()}

    def refresh(self, round_: int) -> None:
        """After a generator round: the pool from the samples just received (if any)."""
        if self.received:
            self.pool = self.make_pool(round_)

    def make_pool(self, round_: int) -> Samples:
        """The latest samples of every node or, with server generators, as many draws per
        class of generators the server trains on them: conditioned on the class prompts, or
        labelled by the nearest centroid of the pooled samples (``generator.conditional``)."""
        x = torch.cat([s[0] for s in self.received.values()])
        y = torch.cat([s[1] for s in self.received.values()])
        if self.config.server.generator.granularity is ServerGranularity.none:
            return x, y
        g = self.config.generator
        rows = x.reshape(len(x), -1)
        self.server_bank = self.server_bank or self.new_server_bank(rows.shape[1])
        prompts = self.shared.prompts if self.server_bank.model.cond else None
        seed = self.config.seed
        rngs = [stream(seed, round_=round_, node=0, generator=k,
                       purpose=Purpose.server_generator_training, device=rows.device)
                for k in range(self.server_bank.model.k)]
        self.server_bank.fit(rows, y, prompts,
                             vae_loss(g, rounds=self.config.federation.rounds, round_=round_), rngs,
                             where=f"server, round {round_}: ")
        present = y.unique().tolist()
        counts = {c: int((y == c).sum()) for c in present}
        centroids = {c: rows[y == c].mean(0) for c in present}
        sx, sy = self.server_bank.sample(counts, prompts, centroids, stream(
            seed, round_=round_, node=0, generator=0, purpose=Purpose.server_synthetic_samples))
        if labels_by_centroid(self.server_bank):
            self.report_label_shares("server", sy)
        return sx.reshape(len(sx), *x.shape[1:]), sy

    def federation_classes(self) -> list[int]:
        """Dataset ids of every class some node trains on (sorted)."""
        held = torch.cat([self.shared.labels[c.train_idx] for c in self.clients])
        return sorted(set(held.tolist()))

    def new_server_bank(self, features: int) -> Bank:
        """The server's generators over every class of the federation (so a round's sampled
        clients train the same bank), conditioned as a node's of that granularity would be."""
        g = self.config.generator
        granularity = Granularity(self.config.server.generator.granularity.value)
        spec = generator_spec(self.federation_classes(), self.shared.class_names,
                              granularity, g.class_groups)
        return new_bank(spec, features, g, condition_width(self.shared, g, granularity),
                        self.shared.tokens.device)

    def train_on(self, state: StateDict, x: torch.Tensor, y: torch.Tensor, round_: int,
                 which: int, anchor: StateDict | None = None, mu: float = 0.0) -> StateDict:
        """``state`` trained for ``server.synthetic_epochs`` on rows ``x`` labelled ``y``
        (seeded by training ``which`` of the round); with ``anchor``, plus the proximal pull
        ``mu / 2 * ||w - anchor||^2``."""
        def step_loss(net: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor,
                      key: torch.Tensor, step: int) -> torch.Tensor:
            pooled, sequence = net.outputs(xb, key)
            value = self.loss(pooled, yb, sequence)
            if anchor is not None and mu > 0:
                value = value + proximal_term(net, anchor, mu)
            return value

        self.model.load_state_dict(state)
        fit(self.model, step_loss, x, y, self.config.adapter, self.config.server.synthetic_epochs,
            stream_seed(self.config.seed, round_=round_, node=0, generator=which,
                        purpose=Purpose.server_adapter_training), f"server, round {round_}",
            progress=f"round {round_} server")
        return clone_state(self.model.state_dict())

    def curate(self, state: StateDict, x: torch.Tensor, y: torch.Tensor, round_: int
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The pool as fine-tuning data: failed classes dropped (``state`` recognises their real
        val clips above chance, their samples not), the rest balanced to the median class count
        (seeded; with replacement only below it)."""
        s = self.config.server
        classes = y.unique()
        kept = classes
        if s.skip_failed_classes:
            real = self.evaluator.class_recall(state, self.evaluator.merged("val"))
            fake = self.evaluator.class_recall(state, None, x, y)
            chance = 1 / len(self.shared.label_space)
            kept = classes[[not (real.get(c, 0.0) > chance >= fake[c])
                            for c in classes.tolist()]]
        info = {"synthetic/skipped_classes": float(len(classes) - len(kept))}
        if len(kept) == 0:
            return x[:0], y[:0], info
        rows = [torch.nonzero(y == c).flatten() for c in kept]
        if s.synthetic_balance:
            target = int(torch.tensor([len(r) for r in rows]).median())
            rng = stream(self.config.seed, round_=round_, node=0, generator=0,
                         purpose=Purpose.server_curation)
            rows = [r[torch.randperm(len(r), generator=rng)[:target].to(r.device)]
                    if len(r) >= target else
                    r[torch.randint(len(r), (target,), generator=rng).to(r.device)]
                    for r in rows]
        index = torch.cat(rows)
        return x[index], y[index], info

    def distill(self, state: StateDict, x: torch.Tensor, y: torch.Tensor,
                teachers: list[Teacher], round_: int) -> StateDict:
        """``state`` distilled from ``teachers``: each sample's target is the mean output (and
        sequence, for a sequence head) of the teachers that hold its class; MSE + cosine."""
        sequences = self.model.has_sequence
        total = torch.zeros(len(x), self.shared.prompts.shape[1], device=x.device)
        total_sequence = (torch.zeros(len(x), *self.model.sequence.base.shape, device=x.device)
                          if sequences else None)
        count = torch.zeros(len(x), device=x.device)
        for classes, teacher in teachers:
            held = torch.tensor([self.shared.class_names.index(c) for c in classes],
                                device=self.shared.tokens.device)
            mask = torch.isin(y, held)
            self.model.load_state_dict(teacher)
            self.model.eval()
            with torch.no_grad():
                pooled, sequence = self.model.outputs(x[mask])
                total[mask] += pooled
                if total_sequence is not None:
                    total_sequence[mask] += sequence
            count[mask] += 1
        keep = count > 0
        targets = total[keep] / count[keep, None]
        target_sequences = (None if total_sequence is None
                            else total_sequence[keep] / count[keep, None, None])
        a, loss = self.config.adapter, self.loss

        def step_loss(net: torch.nn.Module, xb: torch.Tensor, rows: torch.Tensor,
                      key: torch.Tensor, step: int) -> torch.Tensor:
            out, sequence = net.outputs(xb, key)
            target = targets[rows]
            cosine = 1 - torch.nn.functional.cosine_similarity(out, target, dim=-1).mean()
            value = a.mse_weight * torch.nn.functional.mse_loss(out, target) + (
                a.cosine_weight * cosine)
            if target_sequences is not None:
                error = torch.nn.functional.mse_loss(sequence, target_sequences[rows])
                value = value + loss.sequence_weight * loss.sequence_scale * error
            return value

        self.model.load_state_dict(state)
        rows = torch.arange(int(keep.sum()), device=x.device)
        fit(self.model, step_loss, x[keep], rows, a, self.config.server.synthetic_epochs,
            stream_seed(self.config.seed, round_=round_, node=0, generator=0,
                        purpose=Purpose.server_distillation), f"server, round {round_}",
            progress=f"round {round_} server")
        return clone_state(self.model.state_dict())

    def learn_from_synthetic(self, round_: int, global_state: StateDict, strategy: PoolLearning
                             ) -> tuple[StateDict, dict[str, float]]:
        """The global state after ``strategy`` used the pool, and the scalars: the pool's size and
        what the strategy logs. Also trains the synthetic-only adapter (``synthetic/acc``)."""
        if self.pool is None:
            return global_state, {}
        x, y = self.pool
        metrics = {"synthetic/samples": float(len(x))}
        if self.config.generator.training_data is TrainingData.adapter_output:
            scores = zero_shot_scores(x.mean(1), self.shared.prompts[self.shared.label_space])
            position = torch.searchsorted(self.shared.label_space, y)
            metrics["synthetic/prompt_acc"] = (scores.argmax(1) == position).double().mean().item()
            return global_state, metrics
        global_state, learned = strategy.learn(global_state, round_, x, y)
        metrics.update(learned)
        assert self.tstr_state is not None
        self.tstr_state = (global_state if strategy.global_is_synthetic_only
                           else self.train_on(self.tstr_state, x, y, round_, 2))
        return global_state, metrics

    def tstr_to_score(self) -> StateDict | None:
        """The synthetic-only adapter, once there is a pool it learned from."""
        return self.tstr_state if self.pool is not None else None

    def state_dict(self, optimizers: bool = True) -> dict[str, Any]:
        """The checkpoint keys of the samples, the pool, the server's generators and
        ``tstr_state`` (``optimizers=False``: without the generators' optimizer state)."""
        state: dict[str, Any] = {
            "synthetic": {str(node): list(pair) for node, pair in self.received.items()},
            "tstr_state": self.tstr_state, "majority_shares": dict(self.majority_shares)}
        if self.server_bank is not None:
            state["server_generators"] = bank_state(self.server_bank, optimizers)
            state["pool"] = list(self.pool) if self.pool is not None else None
        return state

    def load_received(self, state: dict[str, Any]) -> None:
        """The samples received, from a checkpoint's ``synthetic`` (none if it has no key)."""
        device = self.shared.tokens.device
        self.received = {int(node): (x.to(device), y.to(device))
                         for node, (x, y) in state.get("synthetic", {}).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s keys; a checkpoint without server generators rebuilds
        the pool from the samples received."""
        device = self.shared.tokens.device
        self.load_received(state)
        if state["tstr_state"] is not None:
            self.tstr_state = {k: v.to(device) for k, v in state["tstr_state"].items()}
        self.majority_shares = dict(state["majority_shares"])
        if "server_generators" in state:
            self.server_bank = self.new_server_bank(bank_features(state["server_generators"]))
            self.server_bank.load_state_dict(state["server_generators"])
            if state["pool"] is not None:
                self.pool = (state["pool"][0].to(device), state["pool"][1].to(device))
        elif self.received:
            self.pool = (torch.cat([s[0] for s in self.received.values()]),
                         torch.cat([s[1] for s in self.received.values()]))
