"""The round loop every server shares: client selection, logging and checkpoints."""

import logging
import time
from abc import ABC, abstractmethod
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from flcore import checkpoint
from flcore.clients.clientbase import ClientBase
from flcore.config import Config
from flcore.errors import ConfigError
from flcore.tracking import Trackers

log = logging.getLogger(__name__)


def clients_per_round(config: Config, num_clients: int) -> int:
    """``federation.clients_per_round``, or ``max(1, round-half-up(client_fraction x nodes))``
    (decimal arithmetic: 0.5 x 5 nodes gives 3, 0.35 x 10 gives 4)."""
    f = config.federation
    if f.clients_per_round is None:
        picked = (Decimal(str(f.client_fraction)) * num_clients).to_integral_value(ROUND_HALF_UP)
        return max(1, int(picked))
    if f.clients_per_round > num_clients:
        raise ConfigError(f"federation.clients_per_round={f.clients_per_round}: the federation "
                          f"has only {num_clients} nodes")
    return f.clients_per_round


SUMMARY_KEYS = (("global/acc", "global acc"), ("val/acc", "val acc"),
                ("synthetic/acc", "synthetic acc"), ("generator/kl_loss", "KL"),
                ("gen/active_units", "active units"), ("images/acc", "images acc"),
                ("privacy/epsilon", "epsilon"), ("privacy/client_epsilon", "client epsilon"))


def round_summary(round_: int, rounds: int, metrics: dict[str, float]) -> str:
    """One line per evaluated round for the console and main.log."""
    parts = [f"{label} {metrics[key]:.4g}" for key, label in SUMMARY_KEYS if key in metrics]
    return f"round {round_}/{rounds}: {', '.join(parts)} ({metrics['time/round_s']:.1f} s)"


class ServerBase(ABC):
    """Runs rounds ``start+1 .. federation.rounds``; subclasses define what a round does."""

    def __init__(self, config: Config, clients: list[ClientBase], trackers: Trackers,
                 run_dir: Path, checkpoint_extra: dict[str, Any]) -> None:
        self.config, self.clients, self.trackers, self.run_dir = config, clients, trackers, run_dir
        self.per_round = clients_per_round(config, len(clients))
        self.checkpoint_extra = checkpoint_extra
        self.history: list[dict[str, Any]] = []
        self.completed_round = 0
        self.rounds_seconds = 0.0
        self.checkpoint_size_logged = False

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
    def state_dict(self, optimizers: bool = True) -> dict[str, Any]:
        """Everything needed to continue after the current round (``optimizers=False``: less
        the optimizer states)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_checkpoint(self, round_: int) -> None:
        """Write the round's checkpoint; the first one's size goes to the log."""
        c = self.config.checkpoint
        path = checkpoint.save(self.run_dir, round_,
                               {"server": self.state_dict(c.optimizer_state),
                                "history": self.history, "rounds_s": self.rounds_seconds,
                                "optimizer_state": c.optimizer_state,
                                **self.checkpoint_extra}, c.keep_last)
        if not self.checkpoint_size_logged:
            log.info("Checkpoint %s: %.1f MB (checkpoint.every=%d, keep_last=%d)", path.name,
                     path.stat().st_size / 1e6, c.every, c.keep_last)
            self.checkpoint_size_logged = True

    def run(self, start: int = 0) -> list[dict[str, Any]]:
        """Rounds ``start+1 .. rounds``: one tracker call per round, checkpoints as configured
        (``checkpoint.every=0``: none). ``completed_round`` tracks progress for an interrupt."""
        rounds = self.config.federation.rounds
        every = self.config.checkpoint.every
        self.completed_round = start
        for round_ in tqdm(range(start + 1, rounds + 1), desc="rounds", unit="round",
                           initial=start, total=rounds, disable=None):
            tic = time.perf_counter()
            metrics = self.train_round(round_, self.select(round_))
            metrics["time/round_s"] = time.perf_counter() - tic
            self.rounds_seconds += metrics["time/round_s"]
            self.history.append({"round": round_, **metrics})
            self.completed_round = round_
            if every > 0 and (round_ % every == 0 or round_ == rounds):
                self.save_checkpoint(round_)
            extra = self.after_checkpoint(round_)
            metrics.update(extra)
            self.history[-1].update(extra)
            if self.is_eval_round(round_):
                log.info("%s", round_summary(round_, rounds, metrics))
            self.trackers.log(metrics, step=round_)
        return self.history

    def after_checkpoint(self, round_: int) -> dict[str, float]:
        """Work on the round's final state once its checkpoint is safe (a failure here loses
        no training); its scalars join the round's."""
        return {}
