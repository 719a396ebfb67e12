"""One client after another through one adapter module: the reference executor."""

from collections.abc import Iterator, Sequence

from flcore.clients.clientA2V import train_adapter
from flcore.clients.protocol import AdapterJob, LocalUpdate, RoundSpec, SharedTensors
from flcore.executors.base import Executor
from flcore.privacy.training import train_private
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter


class Sequential(Executor):
    """Trains each job in turn with :func:`~flcore.clients.clientA2V.train_adapter`."""

    def __init__(self, shared: SharedTensors, loss: AdapterLoss, model: AudioAdapter) -> None:
        super().__init__(shared)
        self.loss, self.model = loss, model

    def train_adapters(self, jobs: Sequence[AdapterJob], spec: RoundSpec
                       ) -> Iterator[LocalUpdate]:
        names = [name for name, _ in self.model.named_parameters()]
        for job in jobs:
            if spec.privacy is not None:
                yield from train_private(names, self.model.num_heads, self.model.dropout,
                                         self.loss, self.shared, [job], spec)
            else:
                yield train_adapter(self.model, self.shared, self.loss, job, spec)
