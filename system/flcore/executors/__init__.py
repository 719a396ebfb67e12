"""How a round's client work runs: one client after another, as one batched model, or on Ray."""

import importlib.util

import torch

from flcore.clients.protocol import SharedTensors
from flcore.config import Config, ExecutorName
from flcore.errors import ConfigError, ResourceError
from flcore.executors.base import Executor
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter


def check_executor(config: Config) -> None:
    """Refuse, before any data is read, ``executor=ray`` without Ray installed (it is the
    ``ray`` extra) and an executor that asks for GPUs this machine lacks (a cluster's GPUs are
    checked when the Ray executor joins it)."""
    x = config.executor
    if x.name is ExecutorName.ray and importlib.util.find_spec("ray") is None:
        raise ConfigError("executor=ray: Ray is not installed; pip install -e \".[ray]\" (or "
                          "use executor=batched, which needs nothing more)")
    if (x.name is ExecutorName.ray and x.num_gpus > 0 and x.address is None
            and not torch.cuda.is_available()):
        raise ResourceError(f"executor.num_gpus={x.num_gpus:g}: this machine has no CUDA GPU; "
                            "set executor.num_gpus=0, or point executor.address at a Ray "
                            "cluster with GPUs")


def build_executor(config: Config, shared: SharedTensors, loss: AdapterLoss,
                   model: AudioAdapter) -> Executor:
    """The executor ``executor.name`` names (Ray is imported only when asked for)."""
    x = config.executor
    if x.name is ExecutorName.sequential:
        from flcore.executors.sequential import Sequential
        return Sequential(shared, loss, model)
    if x.name is ExecutorName.batched:
        from flcore.executors.batched import Batched
        return Batched(shared, loss, model, x.clients_per_batch)
    from flcore.executors.ray import RayExecutor
    return RayExecutor(config, shared, loss, model)
