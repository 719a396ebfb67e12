"""The A2V server: adapter aggregation, the reference algorithms, zero-shot evaluation."""

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from flcore.clients.clientA2V import ClientA2V, evaluate, zero_shot
from flcore.clients.clientbase import SharedTensors, StateDict
from flcore.config import Aggregation, Algorithm, Config
from flcore.metrics.classification import confusion_matrix, per_class_accuracy
from flcore.servers.aggregation import FedAdam, RunningAverage
from flcore.servers.serverbase import ServerBase
from flcore.tracking import Trackers
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter


def _clone(state: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


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

    def train_round(self, round_: int, selected: list[ClientA2V]) -> dict[str, float]:
        f = self.config.federation
        evaluate_now = self.is_eval_round(round_)
        fedprox = f.aggregation is Aggregation.fedprox
        average, losses, node_acc = RunningAverage(), [], {}
        unweighted = f.aggregation is Aggregation.mean
        for client in tqdm(selected, desc=f"round {round_}", unit="client", leave=False):
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
            if self.algorithm is Algorithm.federated:
                average.add(update.state, 1.0 if unweighted else float(update.num_samples))
            elif self.algorithm is Algorithm.centralized:
                self.global_state = update.state
        if self.algorithm is Algorithm.federated:
            self.global_state = (self.fedadam.step(self.global_state, average.result())
                                 if self.fedadam is not None else average.result())
        metrics = {"train/loss_mean": float(np.mean(losses)), "train/clients": float(len(losses))}
        if evaluate_now:
            metrics.update(self.evaluate_global())
            metrics.update(node_acc)
            if node_acc:
                metrics["local/acc_mean"] = float(np.mean(list(node_acc.values())))
        return metrics

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
        return {f"global/{k}": float(np.mean([r[k] for r in results])) for k in results[0]}

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
