"""Aggregation rules against hand-computed values."""

import torch

from flcore.clients.training import proximal_term
from flcore.servers.aggregation import FedAdagrad, FedAdam, FedAvgM, FedYogi, RunningAverage


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


def one(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([value], dtype=torch.float64)}


def test_fedavgm_by_hand() -> None:
    """Hsu et al. 2019: v = beta v + delta, w += lr v."""
    opt = FedAvgM(lr=1.0, momentum=0.9)
    w = opt.step(one(1.0), one(3.0))  # delta = 2: v = 2, w = 3
    torch.testing.assert_close(w["w"], one(3.0)["w"])
    w = opt.step(w, one(2.0))  # delta = -1: v = 0.9 * 2 - 1 = 0.8, w = 3.8
    torch.testing.assert_close(w["w"], one(3.8)["w"])


def test_fedavgm_without_momentum_at_unit_rate_is_fedavg() -> None:
    opt = FedAvgM(lr=1.0, momentum=0.0)
    for average in (3.0, -2.0, 0.5):
        torch.testing.assert_close(opt.step(one(1.0), one(average))["w"], one(average)["w"])


def test_fedadam_two_steps_by_hand() -> None:
    """Reddi et al. 2021, Algorithm 2: m, v without bias correction, v_{-1} = tau^2."""
    adam = FedAdam(lr=0.1, betas=(0.9, 0.99), tau=0.01)
    w = adam.step(one(1.0), one(3.0))
    # delta = 2: m = 0.2, v = 0.99 * 1e-4 + 0.01 * 4 = 0.040099
    w1 = 1 + 0.1 * 0.2 / (0.040099**0.5 + 0.01)
    torch.testing.assert_close(w["w"], one(w1)["w"])
    w = adam.step(w, one(w1 - 1.0))  # delta = -1
    m, v = 0.9 * 0.2 - 0.1, 0.99 * 0.040099 + 0.01
    torch.testing.assert_close(w["w"], one(w1 + 0.1 * m / (v**0.5 + 0.01))["w"])
    restored = FedAdam(lr=0.1, betas=(0.9, 0.99), tau=0.01)
    restored.load_state_dict(adam.state_dict())
    torch.testing.assert_close(restored.state["m"]["w"], one(m)["w"])
    torch.testing.assert_close(restored.state["v"]["w"], one(v)["w"])


def test_fedadagrad_two_steps_by_hand() -> None:
    opt = FedAdagrad(lr=0.1, betas=(0.9, 0.99), tau=0.01)
    w = opt.step(one(1.0), one(3.0))  # delta = 2: m = 0.2, v = 1e-4 + 4
    w1 = 1 + 0.1 * 0.2 / (4.0001**0.5 + 0.01)
    torch.testing.assert_close(w["w"], one(w1)["w"])
    w = opt.step(w, one(w1 - 1.0))  # delta = -1: m = 0.08, v = 4.0001 + 1
    torch.testing.assert_close(w["w"], one(w1 + 0.1 * 0.08 / (5.0001**0.5 + 0.01))["w"])


def test_fedyogi_three_steps_by_hand() -> None:
    """v moves towards delta^2 by (1 - b2) delta^2 and, unlike Adam's, does not decay when
    the updates vanish."""
    opt = FedYogi(lr=0.1, betas=(0.9, 0.99), tau=0.01)
    w = opt.step(one(1.0), one(3.0))  # delta^2 = 4 > v: v = 1e-4 + 0.04
    w1 = 1 + 0.1 * 0.2 / (0.0401**0.5 + 0.01)
    torch.testing.assert_close(w["w"], one(w1)["w"])
    w = opt.step(w, one(w1 - 1.0))  # delta^2 = 1 > v: v = 0.0401 + 0.01, m = 0.08
    w2 = w1 + 0.1 * 0.08 / (0.0501**0.5 + 0.01)
    torch.testing.assert_close(w["w"], one(w2)["w"])
    w = opt.step(w, one(w2))  # delta = 0: v stays 0.0501, m = 0.072
    torch.testing.assert_close(opt.state["v"]["w"], one(0.0501)["w"])
    torch.testing.assert_close(w["w"], one(w2 + 0.1 * 0.072 / (0.0501**0.5 + 0.01))["w"])


def test_adaptive_optimizers_keep_moving_on_momentum_when_the_average_stands_still() -> None:
    """Unlike FedAvg, a round whose average equals the global weights still moves them: m
    decays but is not zero."""
    for opt in (FedAdam(0.1, (0.9, 0.99), 0.01), FedYogi(0.1, (0.9, 0.99), 0.01),
                FedAdagrad(0.1, (0.9, 0.99), 0.01), FedAvgM(1.0, 0.9)):
        start = one(1.0)
        torch.testing.assert_close(opt.step(start, one(1.0))["w"], start["w"])  # m = 0
        w1 = opt.step(start, one(3.0))["w"]
        w2 = opt.step({"w": w1.clone()}, {"w": w1.clone()})["w"]
        assert (w2 - w1).item() > 0, type(opt).__name__
        torch.testing.assert_close(start["w"], one(1.0)["w"])


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
