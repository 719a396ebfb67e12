"""Aggregation rules against hand-computed values."""

import torch

from flcore.clients.training import proximal_term
from flcore.servers.aggregation import FedAdam, RunningAverage


def average(states: list[dict], weights: list[float]) -> dict:
    running = RunningAverage()
    for state, weight in zip(states, weights, strict=True):
        running.add(state, weight)
    return running.result()


def test_weighted_average_by_sample_counts() -> None:
    first, second = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([4.0, 8.0])}
    out = average([first, second], [30.0, 10.0])
    # (30 * [1, 2] + 10 * [4, 8]) / 40
    torch.testing.assert_close(out["w"], torch.tensor([1.75, 3.5]))
    # The clients' states are left as they were.
    torch.testing.assert_close(first["w"], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(second["w"], torch.tensor([4.0, 8.0]))


def test_unweighted_mean() -> None:
    states = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}, {"w": torch.tensor([7.0])}]
    torch.testing.assert_close(average(states, [1.0, 1.0, 1.0])["w"], torch.tensor([4.0]))


def test_fedadam_two_steps_by_hand() -> None:
    adam = FedAdam(lr=0.1, betas=(0.9, 0.99), tau=0.01)
    w = {"w": torch.tensor([1.0])}
    w = adam.step(w, {"w": torch.tensor([3.0])})
    # delta=2: m=0.2, v=0.04, w = 1 + 0.1*0.2/(0.2+0.01)
    torch.testing.assert_close(w["w"], torch.tensor([1 + 0.1 * 0.2 / 0.21]))
    w1 = w["w"].item()
    w = adam.step(w, {"w": torch.tensor([w1 - 1.0])})
    m = 0.9 * 0.2 + 0.1 * -1.0
    v = 0.99 * 0.04 + 0.01 * 1.0
    torch.testing.assert_close(w["w"], torch.tensor([w1 + 0.1 * m / (v**0.5 + 0.01)]))
    restored = FedAdam(lr=0.1, betas=(0.9, 0.99), tau=0.01)
    restored.load_state_dict(adam.state_dict())
    torch.testing.assert_close(restored.m["w"], torch.tensor([m]))


def test_fedadam_keeps_moving_on_momentum_when_the_average_stands_still() -> None:
    """Unlike FedAvg, a round whose average equals the global weights still moves them: m
    decays but is not zero."""
    adam = FedAdam(lr=0.1, betas=(0.9, 0.99), tau=0.01)
    start = {"w": torch.tensor([1.0])}
    unchanged = adam.step(start, {"w": torch.tensor([1.0])})
    torch.testing.assert_close(unchanged["w"], torch.tensor([1.0]))  # m = v = 0: no step
    w = adam.step(start, {"w": torch.tensor([3.0])})  # m = 0.2, v = 0.04
    w1 = w["w"].clone()
    w = adam.step(w, {"w": w1.clone()})  # delta = 0: m = 0.18, v = 0.0396
    torch.testing.assert_close(w["w"], w1 + 0.1 * 0.18 / (0.0396**0.5 + 0.01))
    torch.testing.assert_close(start["w"], torch.tensor([1.0]))


def test_fedprox_gradient_is_mu_times_the_drift() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    anchor = {"weight": torch.tensor([[0.5, 0.5]])}
    term = proximal_term(model, anchor, mu=0.2)
    torch.testing.assert_close(term, torch.tensor(0.1 * (0.25 + 6.25)))
    term.backward()
    torch.testing.assert_close(model.weight.grad, 0.2 * torch.tensor([[0.5, -2.5]]))


def test_fedprox_term_covers_every_parameter() -> None:
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.bias.fill_(-1.0)
    anchor = {"weight": torch.tensor([[1.0]]), "bias": torch.tensor([1.0])}
    # mu / 2 * ((2 - 1)^2 + (-1 - 1)^2)
    torch.testing.assert_close(proximal_term(model, anchor, mu=0.5), torch.tensor(0.25 * 5.0))
