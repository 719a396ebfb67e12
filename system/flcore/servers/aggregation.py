"""Aggregation of client adapters: weighted and unweighted averages, and FedAdam (FedOpt)."""

import torch

from flcore.clients.protocol import StateDict


class RunningAverage:
    """``sum_i w_i * state_i / sum_i w_i``, accumulated as updates arrive (FedAvg with sample
    counts as weights), so a round never holds every client's weights at once."""

    def __init__(self) -> None:
        self.total: StateDict = {}
        self.weight = 0.0

    def add(self, state: StateDict, weight: float) -> None:
        for key, value in state.items():
            if key in self.total:
                self.total[key].add_(value, alpha=weight)
            else:
                self.total[key] = value.detach().clone().mul_(weight)
        self.weight += weight

    def result(self) -> StateDict:
        return {key: value / self.weight for key, value in self.total.items()}


class FedAdam:
    """Server-side Adam on the averaged client update (Reddi et al. 2021, FedOpt).

    With ``delta = average - global``: ``m = b1 m + (1 - b1) delta``,
    ``v = b2 v + (1 - b2) delta^2``, ``global += lr * m / (sqrt(v) + tau)``.
    """

    def __init__(self, lr: float, betas: tuple[float, float], tau: float) -> None:
        self.lr, self.betas, self.tau = lr, betas, tau
        self.m: StateDict = {}
        self.v: StateDict = {}

    def step(self, current: StateDict, average: StateDict) -> StateDict:
        b1, b2 = self.betas
        updated = {}
        for key, weight in current.items():
            delta = average[key] - weight
            self.m[key] = b1 * self.m.get(key, torch.zeros_like(delta)) + (1 - b1) * delta
            self.v[key] = b2 * self.v.get(key, torch.zeros_like(delta)) + (1 - b2) * delta**2
            updated[key] = weight + self.lr * self.m[key] / (self.v[key].sqrt() + self.tau)
        return updated

    def state_dict(self) -> dict[str, StateDict]:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, StateDict]) -> None:
        self.m, self.v = dict(state["m"]), dict(state["v"])
