"""The clients' generators on the server's side: training them by the executor on generator
rounds, the log of every generator epoch, their checkpoint part, and loading those of an
earlier run (``generator.load_from``)."""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flcore import checkpoint
from flcore.clients.clientA2V import ClientA2V
from flcore.clients.protocol import PrivacySpec, SharedTensors, StateDict
from flcore.config import Config, TrainingData
from flcore.errors import ConfigError
from flcore.executors.base import Executor
from flcore.servers.states import bank_state
from flcore.servers.synthetic import SyntheticLearner, labels_by_centroid
from flcore.tracking import Trackers
from flcore.trainmodel.adapters import AudioAdapter
from flcore.trainmodel.bank_training import EpochLog
from flcore.trainmodel.generators import GeneratorBank
from flcore.trainmodel.vae import vae_loss

#: Config keys whose values must match for generators of an earlier run to load.
GENERATOR_SHAPE_KEYS = ("generator.model", "generator.likelihood", "generator.decoder_variance",
                        "generator.sequence_length",
                        "generator.latent_dim",
                        "generator.hidden_dim", "generator.conditional",
                        "generator.gaussian_covariance", "generator.gaussian_rank")


def generator_scalars(epochs: list[EpochLog], prefix: str) -> dict[str, float]:
    """One epoch's ``{prefix}generator/*`` scalars over the generators of ``epochs`` (one log
    per node): means over generators (NaN rows left out), betas and steps means over nodes;
    ``weighted_kl`` is the mean of each generator's own beta x KL."""
    def mean(values: list[torch.Tensor]) -> float:
        return float(torch.cat([v.flatten() for v in values]).nanmean())

    kl = mean([e.kl for e in epochs])
    return {f"{prefix}generator/recon_loss": mean([e.recon for e in epochs]),
            f"{prefix}generator/kl_loss": kl,
            f"{prefix}generator/beta": float(np.mean([e.beta for e in epochs])),
            f"{prefix}generator/weighted_kl": mean([e.beta * e.kl for e in epochs]),
            f"{prefix}generator/similarity_loss": mean([e.similarity for e in epochs]),
            f"{prefix}generator/mse": mean([e.mse for e in epochs]),
            f"{prefix}generator/log_sigma2": mean([e.log_sigma2 for e in epochs]),
            f"{prefix}generator/effective_beta": mean([e.effective_beta for e in epochs]),
            f"{prefix}generator/steps_per_epoch": float(np.mean([e.steps for e in epochs]))}


class GeneratorRounds:
    """Trains the selected clients' generators every ``generator.train_every`` rounds, hands
    what each shares to the synthetic learner, and keeps the epoch log and training time."""

    def __init__(self, config: Config, shared: SharedTensors, clients: list[ClientA2V],
                 executor: Executor, model: AudioAdapter, trackers: Trackers) -> None:
        self.config, self.shared, self.clients = config, shared, clients
        self.executor, self.model, self.trackers = executor, model, trackers
        self.enabled = config.generator.enabled
        self.rounds_done = 0
        self.epoch_history: list[dict[str, Any]] = []
        self.seconds = 0.0

    def is_training_round(self, round_: int) -> bool:
        """Whether the clients train generators in ``round_``."""
        return self.enabled and round_ % self.config.generator.train_every == 0

    def training_rounds(self, last: int) -> int:
        """How many of the run's last ``last`` rounds train generators."""
        every, rounds = self.config.generator.train_every, self.config.federation.rounds
        return rounds // every - (rounds - last) // every if self.enabled else 0

    def is_scoring_round(self, round_: int) -> bool:
        """``gen/*`` rounds: every ``eval.generator_every`` and the last, for generators of audio
        embeddings (text-space samples have no held-out real rows to compare with)."""
        every = self.config.eval.generator_every
        return (self.enabled and every > 0
                and self.config.generator.training_data is TrainingData.audio
                and (round_ % every == 0 or round_ == self.config.federation.rounds))

    def train(self, selected: list[ClientA2V], round_: int,
              adapter_of: Callable[[ClientA2V], StateDict],
              learner: SyntheticLearner, privacy: PrivacySpec | None = None
              ) -> dict[int, list[EpochLog]]:
        """Train the selected clients' generators (on their audio embeddings, or on the outputs
        of their adapter ``adapter_of(client)``; with ``privacy`` by DP-SGD), pass their shares
        to ``learner``; the logs."""
        tic = time.perf_counter()
        g = self.config.generator
        jobs = []
        for client in selected:
            adapter = None
            if g.training_data is TrainingData.adapter_output:
                self.model.load_state_dict(adapter_of(client))
                adapter = self.model
            jobs.append(client.generator_job(self.shared, g, round_, self.config.seed, adapter))
        banks = [client.generators for client in selected]
        epochs = self.executor.train_generators(
            banks, jobs, vae_loss(g, rounds=self.config.federation.rounds, round_=round_),
            privacy)
        logs: dict[int, list[EpochLog]] = {}
        for client, job, client_epochs in zip(selected, jobs, epochs, strict=True):
            if client_epochs:
                logs[client.node] = client_epochs
            learner.accept_share(client.node, client.share_generators(job, g),
                                 labels_by_centroid(client.generators))
        self.seconds += time.perf_counter() - tic
        return logs

    def log_epochs(self, round_: int, logs: dict[int, list[EpochLog]]) -> dict[str, float]:
        """One tracker row per generator epoch (means over all generators, each node's, and
        each generator's decoder variance); the last epoch's ``generator/*`` means."""
        epochs = self.config.generator.training_epochs
        before = self.rounds_done * epochs  # generator/epoch counts over the run
        names = {c.node: c.generators.spec.names for c in self.clients if c.node in logs
                 and c.generators is not None}
        row: dict[str, float] = {}
        for e in range(epochs):
            row = {"generator/epoch": float(before + e + 1)}
            parts = {"": [log[e] for log in logs.values()]}
            parts.update({f"node{node}/": [log[e]] for node, log in logs.items()})
            for prefix, epoch_logs in parts.items():
                row.update(generator_scalars(epoch_logs, prefix))
            for node, log in logs.items():
                row.update({f"node{node}/generator/log_sigma2/{name}": float(value)
                            for name, value in zip(names[node], log[e].log_sigma2.tolist(),
                                                   strict=True)})
            self.trackers.log_epoch(row, step=round_)
            self.epoch_history.append({"round": round_, **row})
        self.rounds_done += 1
        return {k: v for k, v in row.items() if k.startswith("generator/")}

    def state_dict(self, optimizers: bool = True) -> dict[str, Any]:
        """The checkpoint keys of the clients' generators, the epoch log and the time."""
        return {"generators": {str(c.node): bank_state(c.generators, optimizers)
                               for c in self.clients if c.generators is not None},
                "epoch_history": self.epoch_history, "generator_seconds": self.seconds,
                "generator_rounds_done": self.rounds_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s keys."""
        for client in self.clients:
            if str(client.node) in state["generators"]:
                client.generators = client.new_generators(self.shared, self.config.generator)
                client.generators.load_state_dict(state["generators"][str(client.node)])
        self.epoch_history = list(state["epoch_history"])
        self.seconds = state["generator_seconds"]
        self.rounds_done = state["generator_rounds_done"]

    def load_generators(self, folder: str, config_now: dict[str, Any]) -> None:
        """Start from the generators of the latest checkpoint of ``folder``, refused unless its
        encoder, generator shapes and every node's generator classes match this run's. Their
        ``whole_run`` schedule restarts with this run."""
        if not checkpoint.checkpoints(Path(folder)):
            raise ConfigError(f"generator.load_from={folder}: no checkpoint there; point it at "
                              "the folder of a run that saved checkpoints")
        saved = checkpoint.load_latest(Path(folder))
        old, new = checkpoint.flatten(saved["config"]), checkpoint.flatten(config_now)
        keys = [k for k in new if k.startswith("audio_encoder.") or k in GENERATOR_SHAPE_KEYS]
        for key in keys:
            if old.get(key) != new[key]:
                raise ConfigError(f"generator.load_from={folder}: its generators were trained "
                                  f"with {key}={old.get(key)}, this run has {new[key]}")
        banks = saved["server"].get("generators", {})
        for client in self.clients:
            state = banks.get(str(client.node))
            if state is None:
                raise ConfigError(f"generator.load_from={folder}: no generators for node "
                                  f"{client.node} there")
            bank = client.new_generators(self.shared, self.config.generator)
            if isinstance(bank, GeneratorBank) and "dec_sigma2" not in state["model"]:
                raise ConfigError(f"generator.load_from={folder}: its generators predate the "
                                  "stored decoder variance (generator.sample_noise); train "
                                  "them again with this version")
            if state["names"] != bank.spec.names:
                raise ConfigError(f"generator.load_from={folder}: node {client.node}'s "
                                  f"generators there model {', '.join(state['names'])}; here "
                                  f"it needs {', '.join(bank.spec.names)}")
            bank.load_state_dict(state)
            bank.trainings = 0
            client.generators = bank
