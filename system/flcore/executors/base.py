"""The interface every executor implements.

An executor trains the round's selected clients' adapters from the weights the strategy chose
and hands back one :class:`~flcore.clients.protocol.LocalUpdate` per
:class:`~flcore.clients.protocol.AdapterJob`, in job order. What a
job carries is small: index tensors into the shared embeddings, a start state, a seed. So an
executor that ships work elsewhere (Ray) sends tensors, never client objects.
"""

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from flcore.clients.protocol import (
    AdapterJob,
    LocalUpdate,
    PrivacySpec,
    RoundSpec,
    SharedTensors,
)
from flcore.progress import phase, stage
from flcore.trainmodel.bank_training import EpochLog
from flcore.trainmodel.banks import Bank, fit_together
from flcore.trainmodel.vae import VAELoss

if TYPE_CHECKING:
    from flcore.clients.clientA2V import GeneratorJob


class Executor(ABC):
    """Runs a round's client work on the shared embeddings."""

    #: Whether :meth:`train_generators` trains every node's generators as one stacked bank
    #: (the same as one by one to float tolerance) rather than one bank after another.
    stack_generators = False

    def __init__(self, shared: SharedTensors) -> None:
        self.shared = shared

    @abstractmethod
    def train_adapters(self, jobs: Sequence[AdapterJob], spec: RoundSpec
                       ) -> Iterator[LocalUpdate]:
        """Train each job's adapter; yield the updates in job order."""

    def train_generators(self, banks: Sequence[Bank], jobs: Sequence["GeneratorJob"],
                         loss: VAELoss | None, privacy: PrivacySpec | None = None
                         ) -> list[list[EpochLog]]:
        """Train each node's generator bank on its job (with ``privacy``, by DP-SGD); each
        bank's epoch logs, in order: one bank after another, or with :attr:`stack_generators`
        every node's as one stacked bank per shape
        (:func:`~flcore.trainmodel.banks.fit_together`), in this process."""
        def fit(group: Sequence[Bank], group_jobs: Sequence["GeneratorJob"]
                ) -> list[list[EpochLog]]:
            return fit_together(group, [j.x for j in group_jobs], [j.labels for j in group_jobs],
                                [j.prompts for j in group_jobs], loss,
                                [j.rngs for j in group_jobs], [j.where for j in group_jobs],
                                privacy=privacy)

        if not self.stack_generators:
            return [fit([bank], [job])[0]
                    for bank, job in phase(zip(banks, jobs, strict=True), "generators", "node",
                                           len(banks))]
        with stage(f"generators ({len(banks)} nodes stacked)") as bar:
            logs = fit(banks, jobs)
            bar.update()
        return logs

    def close(self) -> None:
        """Release what the executor holds: workers, and the device memory torch caches."""
        if self.shared.tokens.device.type == "cuda":
            torch.cuda.empty_cache()
