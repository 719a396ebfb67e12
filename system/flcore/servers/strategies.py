"""How a round turns the clients' adapters and the synthetic pool into the global adapter.

One small object per mode (``federation.algorithm`` x ``server.adapter_training``), all behind
:class:`AdapterStrategy`, as Flower's strategies are: the server's round loop asks the strategy
where each client starts, hands it each update, and lets it conclude the round. A strategy is
given the global state and returns the new one; what it needs besides (the synthetic learner,
the evaluator) it gets at construction.
"""

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from flcore.clients.protocol import AdapterJob, LocalUpdate, RoundSpec, StateDict
from flcore.config import AdapterTraining, Aggregation, Algorithm, Config, SplitKind
from flcore.errors import CheckpointError
from flcore.servers.aggregation import RunningAverage, server_optimizer
from flcore.servers.client_dp import ClientLevelDP
from flcore.servers.evaluation import Evaluator
from flcore.servers.synthetic import SyntheticLearner, Teacher

if TYPE_CHECKING:
    from flcore.clients.clientA2V import ClientA2V

log = logging.getLogger(__name__)


class AdapterStrategy:
    """The base every mode refines. Its defaults: clients start from the global adapter,
    nothing is aggregated and the synthetic pool is not used for the global adapter."""

    #: Whether selected clients train adapters at all (``synthetic``: the server never sees one).
    trains_clients = True
    #: Whether clients keep their own adapter and optimizer between rounds.
    stateful = False
    #: Whether the global adapter is itself trained on synthetic samples only (then it is the
    #: adapter behind ``synthetic/acc``).
    global_is_synthetic_only = False
    #: Whether each node keeps a personal adapter (:meth:`personal_state`), scored on its own
    #: test clips as ``node{i}/acc`` while ``global/*`` scores the global one.
    personal = False

    def begin_round(self) -> None:
        """Reset what a round accumulates."""

    def start(self, client: "ClientA2V", global_state: StateDict) -> StateDict:
        """The weights ``client`` starts local training from."""
        return global_state

    def anchor(self, global_state: StateDict) -> StateDict | None:
        """The anchor of the jobs' proximal terms (the round's global weights), or None."""
        return None

    def jobs(self, client: "ClientA2V", job: AdapterJob, global_state: StateDict,
             round_: int) -> list[AdapterJob]:
        """``client``'s jobs this round, given its plain one: that job with the strategy's
        terms (proximal weight, linear term, generated batches), and any personal job."""
        return [job]

    def phases(self, spec: RoundSpec, global_state: StateDict) -> list[RoundSpec]:
        """The round's local training as phases run one after another, each from where the
        previous left every job (FedRep: head, then body)."""
        return [spec]

    def accept(self, client: "ClientA2V", update: LocalUpdate) -> None:
        """Take one client's update."""

    def accept_personal(self, client: "ClientA2V", update: LocalUpdate) -> None:
        """Take the update of one client's personal job."""

    def personal_state(self, client: "ClientA2V", global_state: StateDict) -> StateDict:
        """The adapter node ``client`` uses itself (:attr:`personal` strategies)."""
        raise NotImplementedError

    def round_metrics(self) -> dict[str, float]:
        """What the strategy logs after concluding a round."""
        return {}

    def conclude(self, global_state: StateDict) -> StateDict:
        """After every selected client trained: the new global state."""
        return global_state

    def learn(self, global_state: StateDict, round_: int, x: torch.Tensor, y: torch.Tensor
              ) -> tuple[StateDict, dict[str, float]]:
        """The global state after using the synthetic pool ``x [m, S, D]``, ``y [m]``, and what
        to log about it."""
        return global_state, {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore :meth:`state_dict`'s output."""


class FedAvg(AdapterStrategy):
    """Average of the clients' adapters weighted by their training clips (``mean``: equal
    weights), optionally FedProx's proximal term, or a server optimizer (FedAvgM, FedAdam,
    FedYogi, FedAdagrad) stepping on the averaged update; with ``client_dp``, the average is
    client-level DP-FedAvg's noised mean of clipped updates instead."""

    def __init__(self, config: Config, client_dp: ClientLevelDP | None = None) -> None:
        f = config.federation
        self.weighted = f.aggregation is not Aggregation.mean
        self.fedprox = f.aggregation is Aggregation.fedprox
        self.mu = f.fedprox_mu
        self.optimizer = server_optimizer(f)
        self.average = RunningAverage()
        self.client_dp = client_dp
        self.round_global: StateDict | None = None

    def begin_round(self) -> None:
        self.average = RunningAverage()
        if self.client_dp is not None:
            self.client_dp.begin_round()

    def anchor(self, global_state: StateDict) -> StateDict | None:
        self.round_global = global_state
        return global_state if self.fedprox else None

    def jobs(self, client: "ClientA2V", job: AdapterJob, global_state: StateDict,
             round_: int) -> list[AdapterJob]:
        return [replace(job, mu=self.mu)] if self.fedprox else [job]

    def accept(self, client: "ClientA2V", update: LocalUpdate) -> None:
        self.average.add(update.state, float(update.num_samples) if self.weighted else 1.0)
        if self.client_dp is not None:
            assert self.round_global is not None
            self.client_dp.add(update.state, self.round_global)

    def conclude(self, global_state: StateDict) -> StateDict:
        if self.average.weight == 0:
            return global_state
        average = (self.average.result() if self.client_dp is None
                   else self.client_dp.conclude(global_state))
        return (self.optimizer.step(global_state, average) if self.optimizer is not None
                else average)

    def round_metrics(self) -> dict[str, float]:
        return {} if self.client_dp is None else self.client_dp.metrics()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = ({"server_optimizer": self.optimizer.state_dict()}
                                 if self.optimizer is not None else {})
        if self.client_dp is not None:
            state["client_dp"] = self.client_dp.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if self.client_dp is not None:
            self.client_dp.load_state_dict(state["client_dp"])
        if self.optimizer is not None and "server_optimizer" not in state:
            raise CheckpointError("the checkpoint holds no server optimizer moments (written by "
                                  "a FedA2V whose FedAdam kept them under another key): start "
                                  "the run again without resume=true")
        if self.optimizer is not None:
            self.optimizer.load_state_dict({part: {k: v.to(device) for k, v in values.items()}
                                            for part, values in state["server_optimizer"].items()})


class FedAvgThenSynthetic(FedAvg):
    """FedAvg, then fine-tuning of the averaged adapter on the synthetic pool, built so that it
    cannot make the global adapter worse than FedAvg alone: classes whose samples the FedAvg
    adapter does not recognise are skipped, the rest balanced, a proximal term keeps the weights
    near FedAvg's (as FedProx does for clients, Li et al. 2020), and the result is kept only if
    the nodes' validation accuracy does not drop (``server.synthetic_guard``). It counts the
    rounds it fine-tuned and those whose result it kept, so a study sees how often the guard
    chose."""

    def __init__(self, config: Config, learner: SyntheticLearner, evaluator: Evaluator) -> None:
        super().__init__(config)
        self.learner, self.evaluator = learner, evaluator
        self.mu = config.server.synthetic_mu
        self.guarded = config.server.synthetic_guard
        self.tuned_rounds = 0
        self.accepted_rounds = 0

    def learn(self, global_state: StateDict, round_: int, x: torch.Tensor, y: torch.Tensor
              ) -> tuple[StateDict, dict[str, float]]:
        averaged = global_state
        x, y, info = self.learner.curate(averaged, x, y, round_)
        if len(x):
            tuned = self.learner.train_on(averaged, x, y, round_, 1, anchor=averaged,
                                          mu=self.mu)
            accepted = self.guard(round_, averaged, tuned)
            if accepted:
                global_state = tuned
            self.tuned_rounds += 1
            self.accepted_rounds += accepted
            info["synthetic/accepted"] = float(accepted)
        return global_state, {**info, **self.counters()}

    def guard(self, round_: int, averaged: StateDict, tuned: StateDict) -> bool:
        """Whether to keep ``tuned``: its validation accuracy is not below ``averaged``'s
        (logged); True without ``server.synthetic_guard`` or validation clips."""
        if not self.guarded:
            return True
        before = self.evaluator.val_accuracy(averaged)
        if before is None:
            return True
        after = self.evaluator.val_accuracy(tuned)
        accepted = after >= before
        log.info("round %d: synthetic fine-tuning %s (val acc %.3f -> %.3f)", round_,
                 "accepted" if accepted else "rejected", before, after)
        return accepted

    def counters(self) -> dict[str, float]:
        """``synthetic/accepted_rounds`` so far and, once a round fine-tuned,
        ``synthetic/acceptance_rate`` (kept / fine-tuned)."""
        counters = {"synthetic/accepted_rounds": float(self.accepted_rounds)}
        if self.tuned_rounds:
            counters["synthetic/acceptance_rate"] = self.accepted_rounds / self.tuned_rounds
        return counters

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "guard": {"tuned_rounds": self.tuned_rounds,
                                                  "accepted_rounds": self.accepted_rounds}}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        super().load_state_dict(state, device)
        self.tuned_rounds = int(state["guard"]["tuned_rounds"])
        self.accepted_rounds = int(state["guard"]["accepted_rounds"])


class SyntheticOnly(AdapterStrategy):
    """The global adapter learns from synthetic samples alone; clients train generators only."""

    trains_clients = False
    global_is_synthetic_only = True

    def __init__(self, learner: SyntheticLearner) -> None:
        self.learner = learner

    def learn(self, global_state: StateDict, round_: int, x: torch.Tensor, y: torch.Tensor
              ) -> tuple[StateDict, dict[str, float]]:
        return self.learner.train_on(global_state, x, y, round_, 1), {}


class Distillation(AdapterStrategy):
    """Knowledge distillation: the round's client adapters label the synthetic samples of the
    classes they hold, and the global adapter learns those outputs."""

    def __init__(self, learner: SyntheticLearner) -> None:
        self.learner = learner
        self.teachers: list[Teacher] = []

    def begin_round(self) -> None:
        self.teachers = []

    def accept(self, client: "ClientA2V", update: LocalUpdate) -> None:
        self.teachers.append((client.classes, update.state))

    def learn(self, global_state: StateDict, round_: int, x: torch.Tensor, y: torch.Tensor
              ) -> tuple[StateDict, dict[str, float]]:
        if self.teachers:
            global_state = self.learner.distill(global_state, x, y, self.teachers, round_)
        return global_state, {}


class Local(AdapterStrategy):
    """Each node trains its own adapter and never shares it (the lower reference point)."""

    stateful = True

    def start(self, client: "ClientA2V", global_state: StateDict) -> StateDict:
        assert client.model_state is not None
        return client.model_state

    def accept(self, client: "ClientA2V", update: LocalUpdate) -> None:
        client.model_state = update.state


class Centralized(Local):
    """One client holds every node's training clips (the upper reference point); its adapter is
    the global one."""

    def __init__(self) -> None:
        self.latest: StateDict | None = None

    def begin_round(self) -> None:
        self.latest = None

    def accept(self, client: "ClientA2V", update: LocalUpdate) -> None:
        client.model_state = update.state
        self.latest = update.state

    def conclude(self, global_state: StateDict) -> StateDict:
        return self.latest if self.latest is not None else global_state


def unguarded_warnings(config: Config, val_clips: int) -> list[str]:
    """The warning of a ``fedavg+synthetic`` run whose nodes hold no validation clips: its
    guard and class skip then do nothing, and it should say so once rather than keep every
    fine-tuned adapter in silence."""
    s, d = config.server, config.dataset
    if (val_clips or config.federation.algorithm is not Algorithm.federated
            or s.adapter_training is not AdapterTraining.fedavg_synthetic
            or not (s.synthetic_guard or s.skip_failed_classes)):
        return []
    key, value = (("dataset.val_folds", d.val_folds) if d.split is SplitKind.folds
                  else ("dataset.val_ratio", d.val_ratio))
    return [f"server.adapter_training=fedavg+synthetic without validation clips ({key}="
            f"{value}): server.synthetic_guard and server.skip_failed_classes do nothing, so "
            f"every fine-tuned adapter is kept and no class is skipped; give the nodes "
            f"validation clips with {key}, or set server.adapter_training=fedavg"]
