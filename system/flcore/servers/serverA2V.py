"""The A2V server: adapter aggregation, the reference algorithms, zero-shot evaluation."""

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from flcore import checkpoint
from flcore.clients.clientA2V import ClientA2V, evaluate, zero_shot
from flcore.clients.clientbase import SharedTensors, StateDict, fit, training_seed
from flcore.config import (
    Aggregation,
    Algorithm,
    Config,
    Granularity,
    ScheduleScope,
    ServerGranularity,
    TrainingData,
)
from flcore.errors import ConfigError
from flcore.metrics.classification import (
    confusion_matrix,
    per_class_accuracy,
    zero_shot_scores,
)
from flcore.servers.aggregation import FedAdam, RunningAverage
from flcore.servers.serverbase import ServerBase
from flcore.tracking import Trackers
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter
from flcore.trainmodel.generators import (
    EpochLog,
    GeneratorBank,
    SyntheticShare,
    generator_spec,
    vae_loss,
)

SERVER_STREAM = 1_000_000
GENERATOR_SHAPE_KEYS = ("generator.sequence_length", "generator.latent_dim",
                        "generator.hidden_dim", "generator.conditional")


def _clone(state: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


def _generator_scalars(epochs: list[EpochLog], prefix: str) -> dict[str, float]:
    """The fix report's keys, averaged over the generators of ``epochs``."""
    def mean(values: list[torch.Tensor]) -> float:
        return float(torch.cat([v.flatten() for v in values]).mean())

    beta = epochs[0].beta
    kl = mean([e.kl for e in epochs])
    return {f"{prefix}generator/recon_loss": mean([e.recon for e in epochs]),
            f"{prefix}generator/kl_loss": kl,
            f"{prefix}generator/beta": beta,
            f"{prefix}generator/weighted_kl": beta * kl,
            f"{prefix}generator/similarity_loss": mean([e.similarity for e in epochs])}


class ServerA2V(ServerBase):
    """FedAvg / mean / FedProx / FedAdam over client adapters, or the ``local`` and
    ``centralized`` reference points, evaluated zero-shot against the class prompts."""

    def __init__(self, config: Config, clients: list[ClientA2V], shared: SharedTensors,
                 trackers: Trackers, run_dir: Path, checkpoint_extra: dict[str, Any]) -> None:
        super().__init__(config, clients, trackers, run_dir, checkpoint_extra)
        self.shared = shared
        self.algorithm = config.federation.algorithm
        self.stateful = self.algorithm is not Algorithm.federated
        torch.manual_seed(config.seed)
        self.model = AudioAdapter(shared.tokens.shape[-1], shared.prompts.shape[-1],
                                  config.adapter).to(shared.tokens.device)
        self.global_state = _clone(self.model.state_dict())
        self.loss = AdapterLoss(config.adapter, shared.prompts, shared.label_space)
        f = config.federation
        self.fedadam = (FedAdam(f.server_lr, (f.server_betas[0], f.server_betas[1]),
                                f.server_tau) if f.aggregation is Aggregation.fedadam else None)
        if self.stateful:
            for client in clients:
                client.model_state = _clone(self.global_state)
        g = config.generator
        self.generators_on = g.enabled
        trainings = f.rounds // g.train_every
        self.generator_epochs = g.training_epochs * (
            trainings if g.schedule_scope is ScheduleScope.whole_run else 1)
        self.synthetic: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.synthetic_state = (_clone(self.global_state) if self.generators_on and
                                g.training_data is TrainingData.audio else None)
        self.server_bank: GeneratorBank | None = None
        self.epoch_history: list[dict[str, Any]] = []
        self.generator_seconds = 0.0

    def train_round(self, round_: int, selected: list[ClientA2V]) -> dict[str, float]:
        f = self.config.federation
        evaluate_now = self.is_eval_round(round_)
        fedprox = f.aggregation is Aggregation.fedprox
        average, losses, node_acc = RunningAverage(), [], {}
        unweighted = f.aggregation is Aggregation.mean
        train_adapters = self.config.server.adapter_training != "synthetic"
        distill = self.config.server.adapter_training == "kd"
        teachers: list[tuple[torch.Tensor, StateDict]] = []
        generator_round = self.generators_on and round_ % self.config.generator.train_every == 0
        generator_logs: dict[int, list[EpochLog]] = {}
        for client in tqdm(selected, desc=f"round {round_}", unit="client", leave=False):
            if not train_adapters:
                self.train_client_generators(client, round_, generator_logs)
                continue
            start = client.model_state if self.stateful else self.global_state
            self.model.load_state_dict(start)
            update = client.train(self.model, self.shared, self.loss, self.config.adapter,
                                  f.local_epochs, round_, self.config.seed,
                                  anchor=self.global_state if fedprox else None,
                                  mu=f.fedprox_mu, keep_optimizer=self.stateful)
            if self.stateful:
                client.model_state = update.state
            if evaluate_now and self.algorithm is not Algorithm.centralized and len(
                    client.test_idx):
                node_acc[f"node{client.node}/acc"] = evaluate(self.model, self.shared,
                                                              client.test_idx)["acc"]
            losses.append(update.loss)
            if distill:
                held = torch.tensor([self.shared.class_names.index(c) for c in client.classes],
                                    device=self.shared.tokens.device)
                teachers.append((held, update.state))
            elif self.algorithm is Algorithm.federated:
                average.add(update.state, 1.0 if unweighted else float(update.num_samples))
            elif self.algorithm is Algorithm.centralized:
                self.global_state = update.state
            if generator_round:
                self.train_client_generators(client, round_, generator_logs)
        if self.algorithm is Algorithm.federated and train_adapters and not distill:
            self.global_state = (self.fedadam.step(self.global_state, average.result())
                                 if self.fedadam is not None else average.result())
        metrics = {"train/clients": float(len(selected))}
        if losses:
            metrics["train/loss_mean"] = float(np.mean(losses))
        if generator_logs:
            metrics.update(self.log_generator_epochs(round_, generator_logs))
        if self.synthetic:
            metrics.update(self.learn_from_synthetic(round_, teachers))
        if evaluate_now:
            metrics.update(self.evaluate_global())
            metrics.update(node_acc)
            if node_acc:
                metrics["local/acc_mean"] = float(np.mean(list(node_acc.values())))
        return metrics

    def train_client_generators(self, client: ClientA2V, round_: int,
                                logs: dict[int, list[EpochLog]]) -> None:
        """Train a client's generators (on its audio embeddings, or on the outputs of the adapter
        it just trained, in ``self.model``) and keep what it shares."""
        tic = time.perf_counter()
        adapter = (self.model if self.config.generator.training_data is TrainingData.adapter_output
                   else None)
        logs[client.node], share = client.train_generators(
            self.shared, self.config.generator, self.generator_epochs, round_, self.config.seed,
            adapter)
        x, y = self.receive(share)
        self.generator_seconds += time.perf_counter() - tic
        if len(x):
            self.synthetic[client.node] = (x, y)
        else:
            self.synthetic.pop(client.node, None)

    def log_generator_epochs(self, round_: int,
                             logs: dict[int, list[EpochLog]]) -> dict[str, float]:
        """One tracker row per generator epoch: means over all generators (``generator/*``)
        and over each node's (``node{i}/generator/*``); returns the last epoch's values."""
        g = self.config.generator
        before = (round_ // g.train_every - 1) * g.training_epochs
        row: dict[str, float] = {}
        for e in range(g.training_epochs):
            row = {"generator/epoch": float(before + e + 1)}
            parts = {"": [log[e] for log in logs.values()]}
            parts.update({f"node{node}/": [log[e]] for node, log in logs.items()})
            for prefix, epochs in parts.items():
                row.update(_generator_scalars(epochs, prefix))
            self.trackers.log_epoch(row, step=round_)
            self.epoch_history.append({"round": round_, **row})
        return {k: v for k, v in row.items() if k.startswith("generator/")}

    def synthetic_pool(self, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The latest synthetic samples of every node, or, with server generators, samples of
        generators the server trained on them (as many per class as it received)."""
        x = torch.cat([s[0] for s in self.synthetic.values()])
        y = torch.cat([s[1] for s in self.synthetic.values()])
        granularity = self.config.server.generator.granularity
        if granularity is ServerGranularity.none:
            return x, y
        g = self.config.generator
        rows = x.reshape(len(x), -1)
        self.server_bank = self.server_bank or self.new_server_bank(y, rows.shape[1])
        base = training_seed(self.config.seed, round_, SERVER_STREAM)
        rngs = [torch.Generator(device=rows.device).manual_seed(base + k)
                for k in range(self.server_bank.model.k)]
        self.server_bank.fit(rows, y, None, vae_loss(g, self.generator_epochs), rngs,
                             where=f"server, round {round_}: ")
        present = y.unique().tolist()
        counts = {c: int((y == c).sum()) for c in present}
        centroids = {c: rows[y == c].mean(0) for c in present}
        sx, sy = self.server_bank.sample(counts, None, centroids,
                                         torch.Generator().manual_seed(base))
        return sx.reshape(x.shape[0], *x.shape[1:]), sy

    def new_server_bank(self, labels: torch.Tensor, features: int) -> GeneratorBank:
        """The server's generators over the classes it received samples of."""
        granularity = Granularity(self.config.server.generator.granularity.value)
        spec = generator_spec(sorted(set(labels.tolist())), self.shared.class_names,
                              granularity, self.config.generator.class_groups)
        return GeneratorBank(spec, features, self.config.generator, 0, labels.device)

    def train_on(self, state: StateDict, x: torch.Tensor, y: torch.Tensor, round_: int,
                 stream: int) -> StateDict:
        """``state`` trained for ``server.synthetic_epochs`` on rows ``x`` with labels ``y``."""
        self.model.load_state_dict(state)
        fit(self.model, lambda net, xb, yb: self.loss(net.embed(xb), yb), x, y,
            self.config.adapter, self.config.server.synthetic_epochs,
            training_seed(self.config.seed, round_, SERVER_STREAM + stream),
            f"server, round {round_}")
        return _clone(self.model.state_dict())

    def receive(self, share: SyntheticShare) -> tuple[torch.Tensor, torch.Tensor]:
        """A node's synthetic samples ``[m, S, D]``: as sent, or drawn from its decoders."""
        g = self.config.generator
        if share.decoder is None:
            x, y = share.x, share.y
        else:
            bank = GeneratorBank.from_decoder(share.decoder, g, self.shared.tokens.device)
            prompts = self.shared.prompts if g.conditional else None
            x, y = bank.sample(share.counts, prompts, {}, share.rng)
        width = (self.shared.prompts.shape[-1] if g.training_data is TrainingData.adapter_output
                 else self.shared.tokens.shape[-1])
        return x.reshape(len(x), g.sequence_length, width), y

    def distill(self, x: torch.Tensor, y: torch.Tensor,
                teachers: list[tuple[torch.Tensor, StateDict]], round_: int) -> StateDict:
        """Knowledge distillation into the global adapter: each synthetic sample's target is the
        mean output of the round's client adapters that hold its class (MSE + cosine)."""
        total = torch.zeros(len(x), self.shared.prompts.shape[1], device=x.device)
        count = torch.zeros(len(x), device=x.device)
        for held, state in teachers:
            mask = torch.isin(y, held)
            self.model.load_state_dict(state)
            self.model.eval()
            with torch.no_grad():
                total[mask] += self.model.embed(x[mask])
            count[mask] += 1
        keep = count > 0
        targets = total[keep] / count[keep, None]
        a = self.config.adapter

        def step_loss(net: torch.nn.Module, xb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            out, target = net.embed(xb), targets[rows]
            cosine = 1 - torch.nn.functional.cosine_similarity(out, target, dim=-1).mean()
            return a.mse_weight * torch.nn.functional.mse_loss(out, target) + (
                a.cosine_weight * cosine)

        self.model.load_state_dict(self.global_state)
        rows = torch.arange(int(keep.sum()), device=x.device)
        fit(self.model, step_loss, x[keep], rows, a, self.config.server.synthetic_epochs,
            training_seed(self.config.seed, round_, SERVER_STREAM + 3), f"server, round {round_}")
        return _clone(self.model.state_dict())

    def learn_from_synthetic(self, round_: int,
                             teachers: list[tuple[torch.Tensor, StateDict]]) -> dict[str, float]:
        """Train the global adapter (``synthetic``, ``fedavg+synthetic``, ``kd``) and the
        synthetic-only adapter behind ``synthetic/acc`` on the synthetic pool."""
        x, y = self.synthetic_pool(round_)
        if self.config.generator.training_data is TrainingData.adapter_output:
            scores = zero_shot_scores(x.mean(1), self.shared.prompts[self.shared.label_space])
            position = torch.searchsorted(self.shared.label_space, y)
            return {"synthetic/samples": float(len(x)),
                    "synthetic/acc": (scores.argmax(1) == position).double().mean().item()}
        mode = self.config.server.adapter_training
        if mode in ("synthetic", "fedavg+synthetic"):
            self.global_state = self.train_on(self.global_state, x, y, round_, 1)
        elif mode == "kd" and teachers:
            self.global_state = self.distill(x, y, teachers, round_)
        assert self.synthetic_state is not None
        self.synthetic_state = (self.global_state if mode == "synthetic"
                                else self.train_on(self.synthetic_state, x, y, round_, 2))
        return {"synthetic/samples": float(len(x))}

    def load_generators(self, folder: str, config_now: dict[str, Any]) -> None:
        """Start from the generators of an earlier run (``generator.load_from``): the latest
        checkpoint of ``folder``, refused unless its encoder, generator shapes and every node's
        generator classes match this run."""
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
            if state["names"] != bank.spec.names:
                raise ConfigError(f"generator.load_from={folder}: node {client.node}'s "
                                  f"generators there model {', '.join(state['names'])}; here "
                                  f"it needs {', '.join(bank.spec.names)}")
            bank.load_state_dict(state)
            client.generators = bank

    def merged_test(self) -> torch.Tensor:
        return torch.cat([c.test_idx for c in self.clients])

    def evaluate_global(self) -> dict[str, float]:
        """``global/*`` on the merged test splits: the global adapter, or for ``local`` the mean
        over nodes of each node's own adapter."""
        test = self.merged_test()
        states = ([c.model_state for c in self.clients] if self.algorithm is Algorithm.local
                  else [self.global_state])
        results = []
        for state in states:
            self.model.load_state_dict(state)
            results.append(evaluate(self.model, self.shared, test))
        metrics = {f"global/{k}": float(np.mean([r[k] for r in results])) for k in results[0]}
        if self.synthetic_state is not None and self.synthetic:
            self.model.load_state_dict(self.synthetic_state)
            metrics["synthetic/acc"] = evaluate(self.model, self.shared, test)["acc"]
        return metrics

    def final_report(self, class_names: list[str]) -> tuple[dict[str, float], np.ndarray] | None:
        """Per-class accuracy and the confusion matrix of the global adapter on the merged test
        splits (None for ``local``, which has no global adapter)."""
        if self.algorithm is Algorithm.local:
            return None
        self.model.load_state_dict(self.global_state)
        scores, position = zero_shot(self.model, self.shared, self.merged_test())
        k = len(self.shared.label_space)
        predicted = scores.argmax(1)
        accuracy = per_class_accuracy(position, predicted, k).cpu().tolist()
        names = [class_names[i] for i in self.shared.label_space.tolist()]
        matrix = confusion_matrix(position, predicted, k).cpu().numpy()
        return dict(zip(names, accuracy, strict=True)), matrix

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"global": self.global_state}
        if self.fedadam is not None:
            state["fedadam"] = self.fedadam.state_dict()
        if self.stateful:
            state["clients"] = {str(c.node): {"model": c.model_state,
                                              "optimizer": c.optimizer_state}
                                for c in self.clients}
        if self.generators_on:
            state["generators"] = {str(c.node): c.generators.state_dict()
                                   for c in self.clients if c.generators is not None}
            state["synthetic"] = {str(node): list(pair) for node, pair in self.synthetic.items()}
            state["synthetic_state"] = self.synthetic_state
            state["epoch_history"] = self.epoch_history
            state["generator_seconds"] = self.generator_seconds
            if self.server_bank is not None:
                state["server_generators"] = self.server_bank.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.shared.tokens.device
        self.global_state = {k: v.to(device) for k, v in state["global"].items()}
        if self.fedadam is not None:
            self.fedadam.load_state_dict({part: {k: v.to(device) for k, v in values.items()}
                                          for part, values in state["fedadam"].items()})
        if self.stateful:
            for client in self.clients:
                saved = state["clients"][str(client.node)]
                client.model_state = {k: v.to(device) for k, v in saved["model"].items()}
                client.optimizer_state = saved["optimizer"]
        if self.generators_on:
            for client in self.clients:
                if str(client.node) in state["generators"]:
                    client.generators = client.new_generators(self.shared, self.config.generator)
                    client.generators.load_state_dict(state["generators"][str(client.node)])
            self.synthetic = {int(node): (x.to(device), y.to(device))
                              for node, (x, y) in state["synthetic"].items()}
            if state["synthetic_state"] is not None:
                self.synthetic_state = {k: v.to(device)
                                        for k, v in state["synthetic_state"].items()}
            self.epoch_history = list(state["epoch_history"])
            self.generator_seconds = state["generator_seconds"]
            if "server_generators" in state:
                x = torch.cat([s[0] for s in self.synthetic.values()])
                y = torch.cat([s[1] for s in self.synthetic.values()])
                self.server_bank = self.new_server_bank(y, x[0].numel())
                self.server_bank.load_state_dict(state["server_generators"])
