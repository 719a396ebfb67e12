"""Client-level DP-FedAvg (McMahan et al. 2018) against numbers worked out by hand, the noise's
standard deviation in closed form, the accountant, and a real run that resumes exactly."""

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("opacus")

from conftest import QUICK
from flcore.config import validate
from flcore.errors import ConfigError
from flcore.privacy import accounting
from flcore.servers.client_dp import ClientLevelDP, clipped_update


def dp(noise: float, per_round: int = 2, nodes: int = 4) -> ClientLevelDP:
    return ClientLevelDP(clip=1.0, noise_multiplier=noise, per_round=per_round, nodes=nodes,
                         delta=1e-3, accountant="rdp", seed=0)


def test_updates_are_clipped_over_the_whole_adapter() -> None:
    """An update of norm 5 over two tensors (3 and 4) clipped to 1: 0.6 and 0.8; one of norm
    0.5 is kept as it is."""
    zero = {"a": torch.zeros(1), "b": torch.zeros(1)}
    clipped = clipped_update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, zero, 1.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6]))
    torch.testing.assert_close(clipped["b"], torch.tensor([0.8]))
    kept = clipped_update({"a": torch.tensor([0.3]), "b": torch.tensor([0.4])}, zero, 1.0)
    torch.testing.assert_close(kept["a"], torch.tensor([0.3]))


def test_a_round_by_hand_without_noise() -> None:
    """Global 1; nodes end at 4 (update 3, clipped to 1) and 1.5 (update 0.5): the new global
    is 1 + (1 + 0.5) / 2 nodes a round = 1.75."""
    server = dp(noise=0.0)
    start = {"w": torch.tensor([1.0])}
    server.begin_round()
    server.add({"w": torch.tensor([4.0])}, start)
    server.add({"w": torch.tensor([1.5])}, start)
    torch.testing.assert_close(server.conclude(start)["w"], torch.tensor([1.75]))


def test_the_noise_has_the_planned_spread() -> None:
    """With zero updates the new global is the noise over the expected nodes: its standard
    deviation is sigma * clip / 2 = 0.75 (sigma 1.5), within 3% over 40000 draws."""
    server = dp(noise=1.5)
    start = {"w": torch.zeros(40_000, dtype=torch.float64)}
    server.begin_round()
    server.add(start, start)
    out = server.conclude(start)["w"]
    assert out.mean().abs() < 0.02
    assert out.std().item() == pytest.approx(0.75, rel=0.03)


def test_epsilon_is_the_accountants_for_the_rounds_spent() -> None:
    server = dp(noise=1.2, per_round=2, nodes=8)
    start = {"w": torch.zeros(3)}
    for _ in range(5):
        server.begin_round()
        server.add(start, start)
        server.conclude(start)
    want = accounting.epsilon(1.2, 2 / 8, 5, 1e-3)
    assert server.metrics()["privacy/client_epsilon"] == pytest.approx(want)


def test_a_client_dp_run_resumes_exactly(run_config: Callable[..., dict]) -> None:
    args = (*QUICK, "generator=none", "privacy=client_dp", "federation.local_epochs=1",
            "checkpoint.every=1")
    straight = run_config(*args, "federation.rounds=3", folder="straight")["final"]
    assert straight["privacy/client_epsilon"] > 0
    run_config(*args, "federation.rounds=1", folder="resumed")
    resumed = run_config(*args, "federation.rounds=3", "resume=true", folder="resumed")
    assert resumed["final"] == straight


def test_client_dp_needs_plain_averaging(make_config: Callable) -> None:
    with pytest.raises(ConfigError, match=r"privacy.client_level=True: applies to federated"):
        validate(make_config("privacy=client_dp"))
