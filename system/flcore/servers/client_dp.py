"""Client-level DP-FedAvg (McMahan et al. 2018): the server clips each selected node's update
``w_i - w`` to norm ``S`` (over the whole adapter), sums the clipped updates, adds Gaussian noise
of standard deviation ``sigma S`` and divides by the expected number of nodes a round (their
fixed-denominator estimator), so one node changes the new global adapter by a bounded, noised
amount. Accounted per round as Poisson sampling of nodes at rate (nodes a round) / (nodes), the
approximation McMahan et al. make for their selection."""

import math
from typing import Any

import torch

from flcore.clients.protocol import StateDict
from flcore.privacy.accounting import History
from flcore.streams import Purpose, stream_seed


def clipped_update(state: StateDict, global_state: StateDict, clip: float) -> StateDict:
    """``state - global_state`` scaled to norm at most ``clip`` over all its tensors."""
    delta = {k: state[k] - global_state[k] for k in global_state}
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in delta.values()))
    scale = min(1.0, clip / (norm + 1e-12))
    return {k: v * scale for k, v in delta.items()}


class ClientLevelDP:
    """The clipped sum of a round's updates, its noise, and the epsilon spent so far."""

    def __init__(self, clip: float, noise_multiplier: float, per_round: int, nodes: int,
                 delta: float, accountant: str, seed: int) -> None:
        self.clip, self.noise_multiplier = clip, noise_multiplier
        self.expected, self.rate = per_round, per_round / nodes
        self.delta, self.accountant, self.seed = delta, accountant, seed
        self.total: StateDict | None = None
        self.history = History()
        self.rounds = 0

    def begin_round(self) -> None:
        self.total = None

    def add(self, state: StateDict, global_state: StateDict) -> None:
        """One node's update, clipped, into the round's sum."""
        clipped = clipped_update(state, global_state, self.clip)
        self.total = clipped if self.total is None else {
            k: self.total[k] + v for k, v in clipped.items()}

    def conclude(self, global_state: StateDict) -> StateDict:
        """``global + (clipped sum + noise) / expected nodes``: the round's private average."""
        assert self.total is not None
        self.rounds += 1
        rng = torch.Generator().manual_seed(stream_seed(
            self.seed, round_=self.rounds, node=0, generator=0, purpose=Purpose.client_dp))
        std = self.noise_multiplier * self.clip
        noisy = {k: global_state[k] + (v + torch.normal(0.0, std, v.shape, generator=rng,
                                                        dtype=v.dtype).to(v.device))
                 / self.expected for k, v in self.total.items()}
        self.history.add(self.noise_multiplier, self.rate, 1)
        return noisy

    def metrics(self) -> dict[str, float]:
        """``privacy/client_epsilon`` spent so far, at ``delta``."""
        return {"privacy/client_epsilon": self.history.epsilon(self.delta, self.accountant)}

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "history": [list(e) for e in self.history.entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])
        self.history = History([tuple(e) for e in state["history"]])
