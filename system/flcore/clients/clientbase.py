"""A node as the server sees it: index tensors into the shared embeddings, so an idle client
costs a few index tensors, not a model. Clients of stateful algorithms (``local``,
``centralized``) also keep their model and optimizer state between rounds."""

import torch

from flcore.clients.protocol import StateDict


class ClientBase:
    """A node: its clips (index tensors per split) and, if stateful, its model and optimizer."""

    def __init__(self, node: int, classes: list[str], train: torch.Tensor, val: torch.Tensor,
                 test: torch.Tensor) -> None:
        self.node, self.classes = node, classes
        self.train_idx, self.val_idx, self.test_idx = train, val, test
        self.model_state: StateDict | None = None
        self.optimizer_state: dict | None = None

    @property
    def num_train(self) -> int:
        return len(self.train_idx)
