"""Aggregation of client adapters: weighted and unweighted averages, and the server optimizers
that treat the averaged update as a pseudo-gradient (FedAvgM and the FedOpt family)."""

import torch

from flcore.clients.protocol import StateDict
from flcore.config import Aggregation, FederationConfig


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


class ServerOptimizer:
    """A server step on the round's update ``delta = average - global`` (the negated
    pseudo-gradient); its state is one buffer dict per moment, checkpointed as is."""

    moments: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.state: dict[str, StateDict] = {name: {} for name in self.moments}

    def step(self, current: StateDict, average: StateDict) -> StateDict:
        """The new global weights from the current ones and the clients' average."""
        return {key: self.update(key, weight, average[key] - weight)
                for key, weight in current.items()}

    def update(self, key: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, StateDict]:
        return self.state

    def load_state_dict(self, state: dict[str, StateDict]) -> None:
        self.state = {name: dict(state[name]) for name in self.moments}


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): ``v = beta v + delta``, ``global += lr v``; with
    ``beta = 0`` and ``lr = 1`` it is FedAvg."""

    moments = ("v",)

    def __init__(self, lr: float, momentum: float) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum

    def update(self, key: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        velocity = self.state["v"]
        velocity[key] = self.momentum * velocity.get(key, torch.zeros_like(delta)) + delta
        return weight + self.lr * velocity[key]


class FedOpt(ServerOptimizer):
    """Adaptive server optimizers (Reddi et al. 2021, Algorithm 2), without bias correction:
    ``m = b1 m + (1 - b1) delta``, ``v`` by the rule of the subclass from ``v_{-1} = tau^2``,
    ``global += lr m / (sqrt(v) + tau)``; ``tau`` bounds the adaptivity."""

    moments = ("m", "v")

    def __init__(self, lr: float, betas: tuple[float, float], tau: float) -> None:
        super().__init__()
        self.lr, self.betas, self.tau = lr, betas, tau

    def second_moment(self, v: torch.Tensor, delta2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, key: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        m, v = self.state["m"], self.state["v"]
        m[key] = self.betas[0] * m.get(key, torch.zeros_like(delta)) + (1 - self.betas[0]) * delta
        v[key] = self.second_moment(v.get(key, torch.full_like(delta, self.tau**2)), delta**2)
        return weight + self.lr * m[key] / (v[key].sqrt() + self.tau)


class FedAdagrad(FedOpt):
    """``v = v + delta^2``: the step shrinks as squared updates accumulate."""

    def second_moment(self, v: torch.Tensor, delta2: torch.Tensor) -> torch.Tensor:
        return v + delta2


class FedAdam(FedOpt):
    """``v = b2 v + (1 - b2) delta^2``."""

    def second_moment(self, v: torch.Tensor, delta2: torch.Tensor) -> torch.Tensor:
        return self.betas[1] * v + (1 - self.betas[1]) * delta2


class FedYogi(FedOpt):
    """``v = v - (1 - b2) delta^2 sign(v - delta^2)`` (Zaheer et al. 2018): ``v`` moves towards
    ``delta^2`` by an additive step, so it grows as fast as Adam's but shrinks more slowly."""

    def second_moment(self, v: torch.Tensor, delta2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.betas[1]) * delta2 * torch.sign(v - delta2)


#: The server learning rate of each FedOpt method when ``federation.server_lr`` is null.
FEDOPT_LR = 0.01
_FEDOPT = {Aggregation.fedadam: FedAdam, Aggregation.fedyogi: FedYogi,
           Aggregation.fedadagrad: FedAdagrad}


def server_optimizer(config: FederationConfig) -> ServerOptimizer | None:
    """The server step of ``federation.aggregation``, or None for plain averaging. A null
    ``server_lr`` takes the method's default: ``1 - server_momentum`` for FedAvgM (an effective
    rate of 1, Hsu et al. 2019), :data:`FEDOPT_LR` for the FedOpt family."""
    if config.aggregation is Aggregation.fedavgm:
        lr = 1 - config.server_momentum if config.server_lr is None else config.server_lr
        return FedAvgM(lr, config.server_momentum)
    if config.aggregation in _FEDOPT:
        lr = FEDOPT_LR if config.server_lr is None else config.server_lr
        betas = (config.server_betas[0], config.server_betas[1])
        return _FEDOPT[config.aggregation](lr, betas, config.server_tau)
    return None
