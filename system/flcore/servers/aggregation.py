"""Aggregation of client adapters: weighted and unweighted averages, and FedAdam (FedOpt)."""

import torch

from flcore.clients.clientbase import StateDict


def weighted_average(states: list[StateDict], weights: list[float]) -> StateDict:
    """``sum_i w_i * state_i / sum_i w_i`` for every tensor (FedAvg with sample counts)."""
    total = float(sum(weights))
    return {key: sum(w / total * s[key] for s, w in zip(states, weights, strict=True))
            for key in states[0]}


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
