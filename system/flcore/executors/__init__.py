"""How a round's client work runs: one client after another, as one batched model, or on Ray."""

from flcore.clients.protocol import SharedTensors
from flcore.config import Config, ExecutorName
from flcore.executors.base import Executor
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter


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
