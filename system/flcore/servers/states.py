"""Copies of the states the server keeps: detached clones, CPU copies for what waits between
rounds, and generator banks' checkpoint states."""

from typing import Any

import torch

from flcore.clients.protocol import StateDict
from flcore.trainmodel.banks import Bank


def clone_state(state: StateDict) -> StateDict:
    """A detached copy of ``state``, so later training cannot change it."""
    return {k: v.detach().clone() for k, v in state.items()}


def offload(tree: Any) -> Any:
    """Tensors of a state (or optimizer state) moved to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: offload(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [offload(v) for v in tree]
    return tree


def bank_state(bank: Bank, optimizers: bool) -> dict[str, Any]:
    """``bank``'s checkpoint state, without its optimizer state unless ``optimizers``."""
    return {k: v for k, v in bank.state_dict().items() if optimizers or k != "optimizer"}
