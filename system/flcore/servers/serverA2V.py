"""The A2V server: a coordinator that runs the round loop and delegates the work: local training
to the executor and the strategy, the clients' generators to :class:`GeneratorRounds`, the
synthetic pool to :class:`SyntheticLearner`, scoring to :class:`Evaluator` and images to the
renderer."""

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flcore.clients.clientA2V import ClientA2V
from flcore.clients.protocol import (
    AdapterJob,
    LocalUpdate,
    PrivacySpec,
    RoundSpec,
    SharedTensors,
    StateDict,
)
from flcore.clients.training import build_adapter, build_adapter_loss, training_seed
from flcore.config import Algorithm, Config, TrainingData
from flcore.executors import build_executor
from flcore.progress import phase
from flcore.servers.choose import build_strategy
from flcore.servers.evaluation import Evaluator
from flcore.servers.generator_quality import GeneratorQuality, score_generators
from flcore.servers.generator_rounds import GeneratorRounds
from flcore.servers.privacy_audit import PrivacyAuditor
from flcore.servers.privacy_plan import privacy_ledger
from flcore.servers.rendering import render_sets
from flcore.servers.serverbase import ServerBase
from flcore.servers.states import clone_state, offload
from flcore.servers.synthetic import SyntheticLearner
from flcore.tracking import Trackers
from flcore.trainmodel.bank_training import EpochLog
from flcore.visual.renderer import Renderer, needs_renderer


class ServerA2V(ServerBase):
    """Runs the A2V round: the strategy of ``federation.algorithm`` and
    ``server.adapter_training`` trains the global adapter from client adapters and synthetic
    samples; clients train generators every ``generator.train_every`` rounds; evaluation is
    zero-shot against the class prompts on val, test and each node's test clips."""

    def __init__(self, config: Config, clients: list[ClientA2V], shared: SharedTensors,
                 trackers: Trackers, run_dir: Path, checkpoint_extra: dict[str, Any]) -> None:
        super().__init__(config, clients, trackers, run_dir, checkpoint_extra)
        self.shared = shared
        self.algorithm = config.federation.algorithm
        torch.manual_seed(config.seed)
        self.model = build_adapter(shared, config.adapter)
        self.global_state = clone_state(self.model.state_dict())
        self.loss = build_adapter_loss(shared, config.adapter)
        self.executor = build_executor(config, shared, self.loss, self.model)
        self.evaluator = Evaluator(self.model, shared, clients)
        self.renderer = (Renderer(config, shared, run_dir, trackers) if needs_renderer(config)
                         else None)
        self.node_states: dict[int, StateDict] = {}
        self.generator_rounds = GeneratorRounds(config, shared, clients, self.executor,
                                                self.model, trackers)
        self.synthetic = SyntheticLearner(config, shared, clients, self.model, self.loss,
                                          self.evaluator, self.global_state)
        self.strategy = build_strategy(config, self.synthetic, self.evaluator)
        if self.strategy.stateful or self.strategy.personal:
            for client in clients:
                client.model_state = clone_state(self.global_state)
        self.quality: GeneratorQuality | None = None
        self.ledger = (privacy_ledger(config, shared, clients, self.strategy.trains_clients)
                       if config.privacy.enabled else None)
        self.auditor = (PrivacyAuditor(config, shared, clients, self.model, self.loss)
                        if config.eval.privacy_every else None)
        #: The update each node sent last, kept for the audits' ``adapter_node`` attack.
        self.sent: dict[int, StateDict] = {}

    def train_round(self, round_: int, selected: list[ClientA2V]) -> dict[str, float]:
        strategy, generators = self.strategy, self.generator_rounds
        strategy.begin_round()
        losses: list[float] = []
        generator_round = generators.is_training_round(round_)
        generator_logs: dict[int, list[EpochLog]] = {}
        trained: dict[int, StateDict] = {}
        rendering = self.renderer is not None and self.renderer.is_render_round(round_)
        if strategy.trains_clients:
            keep = (generator_round and self.config.generator.training_data
                    is TrainingData.adapter_output) or (rendering and self.config.images.nodes)
            for client, job, update in self.train_adapters(round_, selected):
                if job.personal:
                    strategy.accept_personal(client, update)
                    continue
                strategy.accept(client, update)
                if self.ledger is not None:
                    self.ledger.spend(client.node)
                losses.append(update.loss)
                if keep:
                    trained[client.node] = update.state
                if self.auditor is not None and not (strategy.stateful or strategy.personal):
                    self.sent[client.node] = offload(update.state)
        if generator_round:
            generator_logs = generators.train(
                selected, round_,
                lambda c: trained.get(c.node) or strategy.start(c, self.global_state),
                self.synthetic, self.generator_privacy())
            if self.ledger is not None:
                for client in selected:
                    self.ledger.spend_generators(client.node)
        self.global_state = strategy.conclude(self.global_state)
        metrics = {"train/clients": float(len(selected)), **strategy.round_metrics()}
        if self.ledger is not None:
            self.ledger.rounds_done = round_
            metrics.update(self.ledger.metrics())
        if losses:
            metrics["train/loss_mean"] = float(np.mean(losses))
        if generator_logs:
            metrics.update(generators.log_epochs(round_, generator_logs))
        if generator_round:
            self.synthetic.refresh(round_)
        metrics.update(self.synthetic.majority_metrics())
        self.global_state, learned = self.synthetic.learn_from_synthetic(
            round_, self.global_state, strategy)
        metrics.update(learned)
        if generators.is_scoring_round(round_) and self.synthetic.received:
            self.quality = score_generators(self.clients, self.synthetic.received, self.shared,
                                            self.config, round_)
            metrics.update(self.quality.scalars)
        if self.is_eval_round(round_):
            metrics.update(self.evaluate_all())
        if self.is_audit_round(round_):
            metrics.update(self.audit(round_))
        if rendering and self.config.images.nodes:
            self.node_states = {n: offload(state) for n, state in trained.items()}
        return metrics

    def after_checkpoint(self, round_: int) -> dict[str, float]:
        """Rendering rounds render after the checkpoint, so a failed render loses no round."""
        if self.renderer is None or not self.renderer.is_render_round(round_):
            return {}
        tic = time.perf_counter()
        metrics = self.render(round_, self.node_states)
        self.node_states = {}
        metrics["time/render_s"] = time.perf_counter() - tic
        return metrics

    def render(self, round_: int, trained: dict[int, StateDict]) -> dict[str, float]:
        """Render and judge ``images.per_class`` clips (or synthetic samples) per class and node
        with the global adapter and, with ``images.nodes``, each node's (:func:`render_sets`)."""
        assert self.renderer is not None
        sets = render_sets(self.config, self.shared, self.clients, self.synthetic.received,
                           self.global_state, trained, self.strategy.stateful)
        metrics = self.renderer.run(round_, self.model, sets)
        self.model.load_state_dict(self.global_state)
        return metrics

    def generator_privacy(self) -> PrivacySpec | None:
        """DP-SGD of the generators (``privacy=dp``): their clipping norm, the run's noise."""
        if self.ledger is None:
            return None
        return PrivacySpec(self.config.privacy.generator_max_grad_norm,
                           self.ledger.noise_multiplier)

    def train_adapters(self, round_: int, selected: list[ClientA2V]
                       ) -> Iterator[tuple[ClientA2V, AdapterJob, LocalUpdate]]:
        """The selected clients' local training by the executor: each client's jobs from the
        strategy (the start it gives, its terms, any personal job), in the strategy's phases;
        a stateful client keeps its optimizer state (on the CPU when the run is on a GPU, so
        idle clients hold no device memory)."""
        f, strategy = self.config.federation, self.strategy
        by_node = {c.node: c for c in selected}
        jobs = [job for c in selected for job in strategy.jobs(
            c, AdapterJob(c.node, c.train_idx, strategy.start(c, self.global_state),
                          c.optimizer_state if strategy.stateful else None,
                          training_seed(self.config.seed, round_, c.node),
                          f"node {c.node}, round {round_}"), self.global_state, round_)]
        privacy = (None if self.ledger is None else
                   PrivacySpec(self.config.privacy.max_grad_norm, self.ledger.noise_multiplier))
        spec = RoundSpec(self.config.adapter, f.local_epochs, strategy.anchor(self.global_state),
                         strategy.stateful, privacy=privacy)
        *first, last = strategy.phases(spec, self.global_state)
        for earlier in first:
            done = self.executor.train_adapters(jobs, earlier)
            jobs = [replace(job, start=u.state) for job, u in zip(jobs, done, strict=True)]
        updates = self.executor.train_adapters(jobs, last)
        for job, update in phase(zip(jobs, updates, strict=True), f"round {round_} clients",
                                 "client", len(jobs)):
            client = by_node[job.node]
            if strategy.stateful:
                update.state = offload(update.state)
                client.optimizer_state = offload(update.optimizer_state)
            yield client, job, update

    def is_audit_round(self, round_: int) -> bool:
        """Every ``eval.privacy_every`` rounds and the last (never with 0)."""
        every = self.config.eval.privacy_every
        return bool(every) and (round_ % every == 0 or round_ == self.config.federation.rounds)

    def audit(self, round_: int) -> dict[str, float]:
        """The membership-inference audits (:class:`PrivacyAuditor`) of the global adapter,
        each node's own adapter, the samples it shared and its generators."""
        assert self.auditor is not None
        device = self.shared.tokens.device
        if self.strategy.stateful or self.strategy.personal:
            own = {c.node: (c.model_state if self.strategy.stateful
                            else self.strategy.personal_state(c, self.global_state))
                   for c in self.clients if c.model_state is not None}
        else:
            own = self.sent
        own = {n: {k: v.to(device) for k, v in s.items()} for n, s in own.items()}
        return self.auditor.run(round_, self.global_state, own, self.synthetic.received)

    def evaluate_all(self) -> dict[str, float]:
        """The round's zero-shot evaluation (:meth:`Evaluator.scores`). Every node is scored,
        sampled this round or not, with the adapter it holds now: the global one, or under
        ``local`` its own (then ``global/*`` and ``val/*`` are means over the nodes'
        adapters)."""
        per_node = self.algorithm is not Algorithm.centralized
        states = ([c.model_state for c in self.clients] if self.strategy.stateful and per_node
                  else [self.global_state])
        metrics = self.evaluator.scores(states, per_node, self.synthetic.tstr_to_score())
        if self.strategy.personal:
            metrics.update(self.evaluator.node_scores(
                {c: self.strategy.personal_state(c, self.global_state) for c in self.clients}))
        return metrics

    def final_report(self, class_names: list[str]) -> tuple[dict[str, float], np.ndarray] | None:
        """Per-class accuracy and the confusion matrix of the global adapter on the merged test
        splits (None for ``local``, which has no global adapter)."""
        if self.algorithm is Algorithm.local:
            return None
        return self.evaluator.final_report(self.global_state, class_names)

    def state_dict(self, optimizers: bool = True) -> dict[str, Any]:
        """Everything a resume needs; ``optimizers=False`` leaves out optimizer states (smaller,
        but a resume from it could not be exact)."""
        state: dict[str, Any] = {"global": self.global_state}
        if optimizers:
            state["strategy"] = self.strategy.state_dict()
        if self.strategy.stateful or self.strategy.personal:
            state["clients"] = {str(c.node): {"model": c.model_state,
                                              **({"optimizer": c.optimizer_state}
                                                 if optimizers and self.strategy.stateful
                                                 else {})}
                                for c in self.clients}
        if self.generator_rounds.enabled:
            state.update(self.generator_rounds.state_dict(optimizers))
            state.update(self.synthetic.state_dict(optimizers))
        if self.ledger is not None:
            state["privacy"] = self.ledger.state_dict()
        if self.sent:
            state["sent"] = {str(n): s for n, s in self.sent.items()}
        return state

    def load_adapters(self, state: dict[str, Any]) -> None:
        """What rendering a saved round needs from its checkpoint (``state_dict``): the global
        adapter, the nodes' own (stateful strategies) and the synthetic samples received."""
        device = self.shared.tokens.device
        self.global_state = {k: v.to(device) for k, v in state["global"].items()}
        if self.strategy.stateful or self.strategy.personal:
            for client in self.clients:
                client.model_state = {k: v.to(device) for k, v in
                                      state["clients"][str(client.node)]["model"].items()}
        self.synthetic.load_received(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.shared.tokens.device

        def to(tensors: StateDict) -> StateDict:
            return {k: v.to(device) for k, v in tensors.items()}

        self.global_state = to(state["global"])
        self.strategy.load_state_dict(state["strategy"], device)
        if self.strategy.stateful or self.strategy.personal:
            for client in self.clients:
                saved = state["clients"][str(client.node)]
                client.model_state = to(saved["model"])
                client.optimizer_state = saved.get("optimizer")
        if self.generator_rounds.enabled:
            self.generator_rounds.load_state_dict(state)
            self.synthetic.load_state_dict(state)
        self.sent = {int(n): dict(s) for n, s in state.get("sent", {}).items()}
        if self.ledger is not None:
            self.ledger.load_state_dict(state["privacy"])
            left = self.config.federation.rounds - self.ledger.rounds_done
            self.ledger.check(left, self.config.privacy.target_epsilon,
                              self.generator_rounds.training_rounds(left))
