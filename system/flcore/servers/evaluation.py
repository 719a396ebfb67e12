"""Zero-shot scoring of adapter states on the nodes' clips: val and test accuracy of the global
adapter and of every node's, per-class recall, and the final per-class report. The server, its
strategies and curation share one evaluator, over the server's adapter module."""

import numpy as np
import torch

from flcore.clients.clientA2V import ClientA2V, evaluate, sequence_fit, zero_shot
from flcore.clients.protocol import SharedTensors, StateDict
from flcore.metrics.classification import (
    classification_metrics,
    confusion_matrix,
    per_class_accuracy,
    zero_shot_scores,
)
from flcore.trainmodel.adapters import AudioAdapter


class Evaluator:
    """Scores adapter states (loaded into ``model`` in turn) on the clips of ``clients``."""

    def __init__(self, model: AudioAdapter, shared: SharedTensors,
                 clients: list[ClientA2V]) -> None:
        self.model, self.shared, self.clients = model, shared, clients

    def merged(self, split: str) -> torch.Tensor:
        """Clip indices of ``split`` (train, val or test) over every node."""
        return torch.cat([getattr(c, f"{split}_idx") for c in self.clients])

    def class_recall(self, state: StateDict, idx: torch.Tensor | None,
                     x: torch.Tensor | None = None, y: torch.Tensor | None = None
                     ) -> dict[int, float]:
        """Zero-shot recall of each class (dataset id) by ``state``: on real clips ``idx``, or
        on rows ``x`` labelled ``y``."""
        if idx is not None:
            x, y = self.shared.tokens[idx], self.shared.labels[idx]
        assert x is not None and y is not None
        if not len(y):
            return {}
        self.model.load_state_dict(state)
        self.model.eval()
        with torch.no_grad():
            scores = torch.cat([zero_shot_scores(self.model.embed(chunk),
                                                 self.shared.prompts[self.shared.label_space])
                                for chunk in x.split(1024)])
        hit = (self.shared.label_space[scores.argmax(1)] == y).double()
        return {c: hit[y == c].mean().item() for c in y.unique().tolist()}

    def val_accuracy(self, state: StateDict) -> float | None:
        """Accuracy of ``state`` on the nodes' validation clips (federated evaluation: each node
        scores its own clips), or None without any."""
        val = self.merged("val")
        if not len(val):
            return None
        self.model.load_state_dict(state)
        return evaluate(self.model, self.shared, val)["acc"]

    def scores(self, states: list[StateDict], per_node: bool,
               tstr_state: StateDict | None) -> dict[str, float]:
        """``global/*`` on the merged test splits, ``val/*`` on the merged val splits (when there
        are any) of one adapter state, or the means over one state per node; with
        ``per_node``, ``node{i}/acc`` on each node's test clips (by node ``i``'s own state when
        there is one per node) and their mean ``local/acc_mean``; and ``synthetic/acc`` of
        ``tstr_state``, the adapter trained on synthetic samples only."""
        test, val = self.merged("test"), self.merged("val")
        runs: list[dict[str, float]] = []
        node_acc: dict[str, float] = {}
        for i, state in enumerate(states):
            self.model.load_state_dict(state)
            scores, position = zero_shot(self.model, self.shared, test)
            row = {f"global/{k}": v for k, v in classification_metrics(position, scores).items()}
            if self.model.has_sequence:
                row.update({f"global/{k}": v for k, v in
                            sequence_fit(self.model, self.shared, test).items()})
            if len(val):
                row.update({f"val/{k}": v for k, v in evaluate(self.model, self.shared,
                                                               val).items()})
            runs.append(row)
            if not per_node:
                continue
            correct = (scores.argmax(1) == position).double().split(
                [len(c.test_idx) for c in self.clients])
            pairs = ([(self.clients[i], correct[i])] if len(states) > 1
                     else zip(self.clients, correct, strict=True))
            node_acc.update({f"node{c.node}/acc": h.mean().item() for c, h in pairs if len(h)})
        metrics = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        if node_acc:
            metrics.update(node_acc)
            metrics["local/acc_mean"] = float(np.mean(list(node_acc.values())))
        if tstr_state is not None:
            self.model.load_state_dict(tstr_state)
            metrics["synthetic/acc"] = evaluate(self.model, self.shared, test)["acc"]
        return metrics

    def node_scores(self, states: dict[ClientA2V, StateDict]) -> dict[str, float]:
        """``node{i}/acc`` of each node's own adapter on its own test clips and their mean
        ``local/acc_mean`` (personalised federated learning's measure)."""
        node_acc = {}
        for client, state in states.items():
            if len(client.test_idx):
                self.model.load_state_dict(state)
                node_acc[f"node{client.node}/acc"] = evaluate(self.model, self.shared,
                                                             client.test_idx)["acc"]
        return {**node_acc, "local/acc_mean": float(np.mean(list(node_acc.values())))}

    def final_report(self, state: StateDict, class_names: list[str]
                     ) -> tuple[dict[str, float], np.ndarray]:
        """Per-class accuracy and the confusion matrix of ``state`` on the merged test splits."""
        self.model.load_state_dict(state)
        scores, position = zero_shot(self.model, self.shared, self.merged("test"))
        k = len(self.shared.label_space)
        predicted = scores.argmax(1)
        accuracy = per_class_accuracy(position, predicted, k).cpu().tolist()
        names = [class_names[i] for i in self.shared.label_space.tolist()]
        matrix = confusion_matrix(position, predicted, k).cpu().numpy()
        return dict(zip(names, accuracy, strict=True)), matrix

