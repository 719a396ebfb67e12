"""Drift-correcting strategies: SCAFFOLD and FedDyn. Each keeps a state per node (a control
variate, a gradient estimate) that a node's next local training reads as a linear term, and a
server state that corrects the average. Both average the clients' adapters unweighted, as their
papers do."""

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from flcore.clients.protocol import AdapterJob, LocalUpdate, RoundSpec, StateDict
from flcore.config import Config
from flcore.servers.aggregation import RunningAverage
from flcore.servers.states import offload
from flcore.servers.strategies import AdapterStrategy

if TYPE_CHECKING:
    from flcore.clients.clientA2V import ClientA2V


def _zeros(state: StateDict) -> StateDict:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def _on(state: StateDict, like: StateDict) -> StateDict:
    return {k: v.to(like[k].device) for k, v in state.items()}


class NodeStates:
    """One state per node, zero until a node first trains, kept on the CPU between rounds."""

    def __init__(self) -> None:
        self.states: dict[int, StateDict] = {}

    def get(self, node: int, like: StateDict) -> StateDict:
        """Node ``node``'s state on ``like``'s devices (zeros shaped as ``like`` at first)."""
        return _on(self.states[node], like) if node in self.states else _zeros(like)

    def set(self, node: int, state: StateDict) -> None:
        self.states[node] = offload(state)

    def state_dict(self) -> dict[str, StateDict]:
        return {str(node): state for node, state in self.states.items()}

    def load_state_dict(self, state: dict[str, StateDict]) -> None:
        self.states = {int(node): dict(values) for node, values in state.items()}


class Scaffold(AdapterStrategy):
    """SCAFFOLD (Karimireddy et al. 2020) with a global step size of 1: each step's gradient is
    corrected by ``c - c_i`` (server and node control variates); a trained node's new ``c_i`` is
    option II's, the mean of the gradients of its own loss over its local steps (under SGD that
    is exactly ``c_i - c + (x - y_i) / (K lr)``; gathered directly, it stays right under AdamW
    and a learning-rate schedule); ``c`` moves by the sum of the nodes' changes over all N
    nodes."""

    def __init__(self, config: Config, num_nodes: int) -> None:
        self.num_nodes = num_nodes
        self.nodes = NodeStates()
        self.control: StateDict | None = None
        self.average = RunningAverage()
        self.change: StateDict | None = None

    def begin_round(self) -> None:
        self.average, self.change = RunningAverage(), None

    def jobs(self, client: "ClientA2V", job: AdapterJob, global_state: StateDict,
             round_: int) -> list[AdapterJob]:
        control = self.control if self.control is not None else _zeros(global_state)
        own = self.nodes.get(client.node, global_state)
        return [replace(job, linear={k: control[k] - own[k] for k in global_state})]

    def phases(self, spec: RoundSpec, global_state: StateDict) -> list[RoundSpec]:
        return [replace(spec, gradient_mean=True)]

    def accept(self, client: "ClientA2V", update: LocalUpdate) -> None:
        assert update.gradient_mean is not None
        new = update.gradient_mean
        old = self.nodes.get(client.node, new)
        change = {k: new[k] - old[k] for k in new}
        self.change = change if self.change is None else {
            k: self.change[k] + change[k] for k in change}
        self.nodes.set(client.node, new)
        self.average.add(update.state, 1.0)

    def conclude(self, global_state: StateDict) -> StateDict:
        if self.average.weight == 0:
            return global_state
        assert self.change is not None
        control = self.control if self.control is not None else _zeros(self.change)
        self.control = {k: control[k] + self.change[k] / self.num_nodes for k in control}
        return self.average.result()

    def state_dict(self) -> dict[str, Any]:
        return {"control": self.control, "nodes": self.nodes.state_dict()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        control = state["control"]
        self.control = None if control is None else {k: v.to(device) for k, v in control.items()}
        self.nodes.load_state_dict(state["nodes"])


class FedDyn(AdapterStrategy):
    """FedDyn (Acar et al. 2021): node ``i`` minimises ``L_i(w) - <g_i, w> + alpha/2
    ||w - w_server||^2``, then ``g_i -= alpha (w_i - w_server)``; the server keeps ``h -=
    alpha/N sum_i (w_i - w_server)`` over the round's nodes and broadcasts ``mean_i w_i -
    h / alpha``."""

    def __init__(self, config: Config, num_nodes: int) -> None:
        self.alpha = config.federation.feddyn_alpha
        self.num_nodes = num_nodes
        self.nodes = NodeStates()
        self.h: StateDict | None = None
        self.server: StateDict | None = None
        self.average = RunningAverage()
        self.drift: StateDict | None = None

    def begin_round(self) -> None:
        self.average, self.drift = RunningAverage(), None

    def anchor(self, global_state: StateDict) -> StateDict | None:
        self.server = global_state
        return global_state

    def jobs(self, client: "ClientA2V", job: AdapterJob, global_state: StateDict,
             round_: int) -> list[AdapterJob]:
        gradient = self.nodes.get(client.node, global_state)
        return [replace(job, mu=self.alpha, linear={k: -v for k, v in gradient.items()})]

    def accept(self, client: "ClientA2V", update: LocalUpdate) -> None:
        assert self.server is not None
        moved = {k: update.state[k] - self.server[k] for k in self.server}
        gradient = self.nodes.get(client.node, self.server)
        self.nodes.set(client.node, {k: gradient[k] - self.alpha * moved[k] for k in moved})
        self.drift = moved if self.drift is None else {k: self.drift[k] + moved[k]
                                                       for k in moved}
        self.average.add(update.state, 1.0)

    def conclude(self, global_state: StateDict) -> StateDict:
        if self.average.weight == 0:
            return global_state
        assert self.drift is not None
        h = self.h if self.h is not None else _zeros(global_state)
        self.h = {k: h[k] - self.alpha / self.num_nodes * self.drift[k] for k in h}
        average = self.average.result()
        return {k: average[k] - self.h[k] / self.alpha for k in average}

    def state_dict(self) -> dict[str, Any]:
        return {"h": self.h, "nodes": self.nodes.state_dict()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.h = None if state["h"] is None else {k: v.to(device) for k, v in state["h"].items()}
        self.nodes.load_state_dict(state["nodes"])
