"""The round loop every server shares: client selection, logging and checkpoints."""

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from flcore import checkpoint
from flcore.clients.clientbase import ClientBase
from flcore.config import Config
from flcore.errors import ConfigError
from flcore.tracking import Trackers


def clients_per_round(config: Config, num_clients: int) -> int:
    """``federation.clients_per_round``, or ``client_fraction`` of the clients (at least one)."""
    f = config.federation
    if f.clients_per_round is None:
        return max(1, round(f.client_fraction * num_clients))
    if f.clients_per_round > num_clients:
        raise ConfigError(f"federation.clients_per_round={f.clients_per_round}: the federation "
                          f"has only {num_clients} nodes")
    return f.clients_per_round


class ServerBase(ABC):
    """Runs rounds ``start+1 .. federation.rounds``; subclasses define what a round does."""

    def __init__(self, config: Config, clients: list[ClientBase], trackers: Trackers,
                 run_dir: Path, checkpoint_extra: dict[str, Any]) -> None:
        self.config, self.clients, self.trackers, self.run_dir = config, clients, trackers, run_dir
        self.per_round = clients_per_round(config, len(clients))
        self.checkpoint_extra = checkpoint_extra
        self.history: list[dict[str, Any]] = []

    def select(self, round_: int) -> list[ClientBase]:
        """A seeded sample of clients for ``round_`` (a pure function of seed and round)."""
        if self.per_round == len(self.clients):
            return list(self.clients)
        rng = np.random.default_rng([self.config.seed, 3, round_])
        chosen = np.sort(rng.choice(len(self.clients), self.per_round, replace=False))
        return [self.clients[i] for i in chosen]

    def is_eval_round(self, round_: int) -> bool:
        f = self.config.federation
        return round_ % f.eval_every == 0 or round_ == f.rounds

    @abstractmethod
    def train_round(self, round_: int, selected: list[ClientBase]) -> dict[str, float]:
        """Local training, aggregation and (on evaluation rounds) evaluation; the round's
        scalars."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the current round."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def run(self, start: int = 0) -> list[dict[str, Any]]:
        """Rounds ``start+1 .. rounds``: one tracker call per round, checkpoints as configured."""
        rounds = self.config.federation.rounds
        for round_ in tqdm(range(start + 1, rounds + 1), desc="rounds", unit="round",
                           initial=start, total=rounds):
            tic = time.perf_counter()
            metrics = self.train_round(round_, self.select(round_))
            metrics["time/round_s"] = time.perf_counter() - tic
            self.trackers.log(metrics, step=round_)
            self.history.append({"round": round_, **metrics})
            if round_ % self.config.checkpoint.every == 0 or round_ == rounds:
                checkpoint.save(self.run_dir, round_,
                                {"server": self.state_dict(), "history": self.history,
                                 **self.checkpoint_extra}, self.config.checkpoint.keep)
        return self.history
