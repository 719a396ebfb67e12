"""Synthetic samples that carry their class, the Gaussian reference floor, and fine-tuning on
synthetic samples that cannot make the global adapter worse than FedAvg alone."""

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from conftest import QUICK_ROUNDS, TINY_GENERATORS
from flcore import checkpoint
from flcore.clients.clientA2V import ClientA2V
from flcore.config import GeneratorConfig, validate
from flcore.trainmodel.gaussian import GaussianBank
from flcore.trainmodel.generators import (
    GeneratorBank,
    GeneratorSpec,
    SyntheticShare,
    generator_spec,
)
from flcore.trainmodel.vae import vae_loss

FAST = (*QUICK_ROUNDS, *TINY_GENERATORS)


@pytest.fixture
def quick(run_config: Callable[..., dict]) -> Callable[..., dict]:
    return partial(run_config, *FAST)


@pytest.mark.parametrize("groups", [[[0, 1, 2, 3]], [[0, 1], [2, 3]]],
                         ids=["unified", "per_group"])
def test_conditional_generators_draw_each_class_from_its_prompt(groups: list[list[int]]
                                                                ) -> None:
    """A conditional bank trained on 4 well-separated classes (means 3 x N(0, 1) in 16
    features, 0.5 x N(0, 1) within a class) draws, for each class c and exactly the count
    asked, rows whose nearest real class centroid is c for a majority of them, also beyond
    what ignoring the condition would give: a generator that ignored it would draw class c's
    rows from the mixture of its classes, nearest c at the rate p_c of the same bank trained
    unconditionally, so c's share must exceed p_c by 5 binomial standard deviations of the
    draws. Given the wrong prompts (each class's draw asked with the next class's prompt) the
    same bank fails the check."""
    k, features, cond, n = 4, 16, 8, 64
    g = torch.Generator().manual_seed(0)
    means = 3 * torch.randn(k, features, generator=g)
    x = torch.cat([means[c] + 0.5 * torch.randn(n, features, generator=g) for c in range(k)])
    y = torch.arange(k).repeat_interleave(n)
    prompts = F.normalize(torch.randn(k, cond, generator=g), dim=-1)
    centroids = torch.stack([x[y == c].mean(0) for c in range(k)])
    config = GeneratorConfig(beta_max=1.0, sample_noise=False, training_epochs=30, hidden_dim=32,
                             latent_dim=4, lr=0.03,
                             batch_size=64)
    spec = GeneratorSpec([f"g{i}" for i in range(len(groups))], groups)

    def fit(cond_dim: int) -> GeneratorBank:
        torch.manual_seed(0)
        bank = GeneratorBank(spec, features, config, cond_dim, torch.device("cpu"))
        bank.fit(x, y, prompts if cond_dim else None, vae_loss(config, rounds=1, round_=1),
                 [torch.Generator().manual_seed(1 + i) for i in range(len(groups))], "")
        return bank

    asked = {0: 300, 1: 200, 2: 400, 3: 250}
    table = {c: centroids[c] for c in range(k)}
    conditional = fit(cond)
    drawn, labels = conditional.sample(asked, prompts, table, torch.Generator().manual_seed(2))
    assert {c: int((labels == c).sum()) for c in asked} == asked
    nearest = torch.cdist(drawn, centroids).argmin(1)

    # The reference: the same bank, trained and sampled without the condition.
    free, free_labels = fit(0).sample(asked, None, table, torch.Generator().manual_seed(2))
    free_nearest = torch.cdist(free, centroids).argmin(1)
    group_of = {c: group for group in groups for c in group}

    def passes(c: int, near: torch.Tensor) -> bool:
        same = torch.isin(free_labels, torch.tensor(group_of[c]))
        p = float((free_nearest[same] == c).double().mean())
        share = float((near == c).double().mean())
        return share > max(0.5, p + 5 * (p * (1 - p) / len(near)) ** 0.5)

    for c in range(k):
        assert passes(c, nearest[labels == c]), (c, nearest[labels == c].bincount(minlength=k))

    wrong, wrong_labels = conditional.sample(asked, prompts.roll(-1, 0), table,
                                             torch.Generator().manual_seed(2))
    wrong_nearest = torch.cdist(wrong, centroids).argmin(1)
    assert not any(passes(c, wrong_nearest[wrong_labels == c]) for c in range(k))


def test_per_class_generators_need_no_condition(make_config: Callable[..., DictConfig]) -> None:
    from flcore.clients.protocol import SharedTensors

    config = validate(make_config())
    shared = SharedTensors(torch.randn(6, 8, 16), torch.tensor([0, 0, 1, 1, 2, 2]),
                           torch.randn(3, 12), torch.arange(3), ["a", "b", "c"])
    node = ClientA2V(0, ["a", "b", "c"], torch.arange(6), torch.arange(0), torch.arange(0))
    assert node.new_generators(shared, config.generator).model.cond == 0
    node.granularity = config.generator.granularity.__class__("unified")
    assert node.new_generators(shared, config.generator).model.cond == 12


def test_majority_share_is_the_largest_class_share_of_the_labels() -> None:
    """``report_label_shares`` on labels built here: the largest bincount over all draws of
    the node, not 1 (a collapsed generator is the one case that gives 1), not a share of the
    largest count or of the classes."""
    from types import SimpleNamespace

    from flcore.servers.synthetic import SyntheticLearner

    stub = SimpleNamespace(shared=SimpleNamespace(class_names=[f"c{i}" for i in range(5)]),
                           majority_shares={})
    cases = {0: [3] * 7 + [1] * 2 + [4] * 3, 1: [0, 2, 2, 0, 0, 4], 2: [1] * 5,
             3: [4, 0, 1, 2, 3, 4, 0, 1]}
    for node, labels in cases.items():
        SyntheticLearner.report_label_shares(stub, f"node{node}", torch.tensor(labels))
    expected = {f"node{node}": np.bincount(labels).max() / len(labels)
                for node, labels in cases.items()}
    assert expected == {"node0": 7 / 12, "node1": 3 / 6, "node2": 1.0, "node3": 2 / 8}
    assert stub.majority_shares == pytest.approx(expected)


def test_the_logged_majority_share_is_that_of_the_saved_synthetic_labels(
        quick, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each node's logged ``majority_share`` equals the largest class share of the
    centroid-labelled synthetic samples its checkpoint holds. The tiny generators here can put
    every draw in one class (share 1), so each node's labels are set here to a mix instead:
    its last ``n // 2 + 1 + node`` of ``n`` draws (at most ``n - 1``) in one class (the
    second-held one for odd nodes), the others in the other."""
    original = ClientA2V.share_generators

    def mixed(self: ClientA2V, *args, **kwargs) -> SyntheticShare:
        share = original(self, *args, **kwargs)
        first, second = sorted(share.counts)[:2]
        minority, majority = (first, second) if self.node % 2 else (second, first)
        n = len(share.y)
        share.y = torch.full_like(share.y, minority)
        share.y[n - min(n - 1, n // 2 + 1 + self.node):] = majority
        return share

    monkeypatch.setattr(ClientA2V, "share_generators", mixed)
    final = quick("federation.rounds=1", "generator=unified", "generator.conditional=false",
                  "checkpoint.every=1")["final"]
    [saved] = checkpoint.checkpoints(tmp_path / "run")
    synthetic = torch.load(saved, weights_only=True)["server"]["synthetic"]
    logged = {int(k.split("/")[0][4:]): v for k, v in final.items()
              if k.endswith("/synthetic/majority_share")}
    assert len(logged) == final["partition/num_nodes"]
    assert sorted(logged) == sorted(int(node) for node in synthetic)
    shares = set()
    for node, (_, y) in synthetic.items():
        counts = np.bincount(y.numpy())
        shares.add(counts.max() / counts.sum())
        assert logged[int(node)] == pytest.approx(counts.max() / counts.sum()), node
    assert len(shares) > 1 and max(shares) < 1, shares  # the labels above are a mix


@pytest.mark.parametrize("granularity", ["per_class", "unified"])
def test_gaussian_floor_runs_at_every_granularity(quick, granularity: str) -> None:
    final = quick("federation.rounds=2", "generator.model=gaussian", f"generator={granularity}",
                  "server.generator.granularity=per_class")["final"]
    assert final["synthetic/samples"] == final["partition/train_clips"]
    assert "gen/fd" in final and "gen/active_units" not in final  # no latent code
    chance = 1 / final["partition/num_classes"]
    assert final["synthetic/acc"] > 2 * chance


def test_a_failed_generator_cannot_pull_the_global_adapter_below_fedavg(
        quick, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node 0's generator collapses on purpose: all its samples are one constant row labelled
    with the wrong class. FedAvg alone, same seed, is the reference."""
    fedavg = quick("federation.rounds=3", "generator=none", folder="fedavg")["final"]
    original = ClientA2V.share_generators

    def collapsed(self: ClientA2V, *args, **kwargs) -> SyntheticShare:
        share = original(self, *args, **kwargs)
        if self.node == 0 and share.x is not None:
            wrong = [c for c in share.y.unique().tolist()][::-1]
            share.y = torch.full_like(share.y, wrong[0]) if len(wrong) == 1 else torch.where(
                share.y == wrong[0], wrong[1], wrong[0])
            share.x = share.x.mean(0, keepdim=True).expand_as(share.x).clone() * 10
        return share

    monkeypatch.setattr(ClientA2V, "share_generators", collapsed)
    guarded = quick("federation.rounds=3", folder="guarded")["final"]
    assert guarded["val/acc"] >= fedavg["val/acc"], (guarded["val/acc"], fedavg["val/acc"])


def test_gaussian_bank_is_the_bank_of_model_gaussian(make_config: Callable[..., DictConfig]
                                                     ) -> None:
    from flcore.trainmodel.banks import new_bank

    config = validate(make_config("generator.model=gaussian"))
    spec = generator_spec([0, 1], ["a", "b"], config.generator.granularity, {})
    assert isinstance(new_bank(spec, 8, config.generator, 0, torch.device("cpu")), GaussianBank)
