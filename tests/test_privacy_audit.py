"""Membership-inference audits: every attack finds the members of a deliberately overfit model
(an adapter trained to memorise random labels, samples that copy their training rows, VAEs
trained long at beta 1 in a real run), and every attack is at chance in a real run when its
"members" are clips no model trained on."""

import math
from collections.abc import Callable
from functools import partial

import pytest
import torch

from conftest import QUICK
from flcore.clients.clientA2V import ClientA2V
from flcore.clients.protocol import SharedTensors
from flcore.config import AdapterConfig
from flcore.metrics.membership import roc_auc
from flcore.servers.privacy_audit import (
    PrivacyAuditor,
    adapter_loss_scores,
    nearest_sample_scores,
)
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter

ATTACKS = ("adapter_global", "adapter_node", "synthetic", "generator", "decoder")
#: One round whose VAEs train long at beta 1 (the true ELBO memorises, see the generator
#: study) and share their decoders; YAMNet tokens of the small set, every clip its own
#: recording, so non-members differ from members only in not being trained on.
OVERFIT = ("logger=[csv]", "federation.rounds=1", "generator.training_epochs=100",
           "generator.beta_max=1", "generator.share=decoder", "checkpoint.every=0",
           "eval.privacy_every=1", "server.adapter_training=fedavg")


def null_auc_sd(n1: int, n0: int) -> float:
    """The AUC's standard deviation when member and non-member scores are exchangeable:
    ``sqrt((n1 + n0 + 1) / (12 n1 n0))`` (the Mann-Whitney statistic's, over ``n1 n0``)."""
    return math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))


def null_sd(final: dict, attack: str, nodes: int) -> float:
    """The null standard deviation of the mean AUC over ``nodes`` nodes of equal set sizes, from
    the set sizes the audit reports."""
    n1 = round(final[f"privacy/mia/{attack}/members"] / nodes)
    n0 = round(final[f"privacy/mia/{attack}/nonmembers"] / nodes)
    return null_auc_sd(n1, n0) / math.sqrt(nodes)


def clips(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_the_loss_attack_finds_what_an_adapter_memorised() -> None:
    """An adapter trained 300 full-batch steps on 16 clips of random tokens with random labels
    can only memorise them: the loss attack separates them from 16 fresh clips (AUC more than
    3 null SDs above 0.5); on 16 other fresh clips as "members" it is at chance."""
    x, y = clips(48, 0)
    shared = SharedTensors(x, y, torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),
                           torch.arange(4), ["a", "b", "c", "d"])
    config = AdapterConfig(hidden_dim=64, num_heads=2, dropout=0.0, weight_decay=0.0, lr=0.01)
    torch.manual_seed(0)
    model = AudioAdapter(6, 8, config)
    loss = AdapterLoss(config, shared.prompts, shared.label_space)
    members, fresh, other = torch.arange(16), torch.arange(16, 32), torch.arange(32, 48)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        value = loss(model.embed(x[members]), y[members])
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    state = model.state_dict()
    band = 3 * null_auc_sd(16, 16)
    score = partial(adapter_loss_scores, model, state, loss, shared)
    assert roc_auc(score(members), score(fresh)) > 0.5 + band
    assert abs(roc_auc(score(other), score(fresh)) - 0.5) < band


def test_the_distance_attack_finds_samples_that_copy_their_rows() -> None:
    """Samples that are training rows plus small noise put members next to a sample (AUC 1);
    samples drawn afresh from the rows' distribution do not (at chance)."""
    g = torch.Generator().manual_seed(0)
    rows, labels = torch.randn(200, 10, generator=g), torch.arange(200) % 2
    members, nonmembers = torch.arange(50), torch.arange(100, 150)
    copies = rows[members] + 0.01 * torch.randn(50, 10, generator=g)
    fresh = torch.randn(50, 10, generator=g)

    def auc(samples: torch.Tensor) -> float:
        def scores(idx: torch.Tensor) -> torch.Tensor:
            return nearest_sample_scores(rows[idx], labels[idx], samples, labels[members])
        return roc_auc(scores(members), scores(nonmembers))

    assert auc(copies) == 1.0
    assert abs(auc(fresh) - 0.5) < 3 * null_auc_sd(50, 50)


@pytest.fixture
def run(run_config: Callable[..., dict]) -> Callable[..., dict]:
    return partial(run_config, *OVERFIT)


def test_the_generator_attacks_find_the_members_of_memorising_vaes(run) -> None:
    """Through the encoder or the decoder alone, the mean AUC over the nodes is more than 3
    null standard deviations above chance (0.5); every attack reports balanced sets and each
    node."""
    final = run()["final"]
    nodes = int(final["partition/num_nodes"])
    for attack in ("generator", "decoder"):
        auc = final[f"privacy/mia/{attack}/auc"]
        assert auc > 0.5 + 3 * null_sd(final, attack, nodes), (attack, auc)
    for attack in ATTACKS:
        assert final[f"privacy/mia/{attack}/members"] == final[
            f"privacy/mia/{attack}/nonmembers"]
        assert len([k for k in final if k.startswith(f"privacy/mia/{attack}/node")]) == nodes


def test_every_attack_is_at_chance_on_clips_never_trained_on(run, monkeypatch) -> None:
    """The same run, auditing two random halves of each node's held-out clips as "members" and
    "non-members": no model saw either, so every AUC is within 3 null standard deviations of
    0.5 (on the benchmark set, whose 96 held-out clips a node make the band narrow)."""

    def halves(self: PrivacyAuditor, client: ClientA2V, round_: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        held = torch.cat([client.val_idx, client.test_idx])
        held = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(round_))]
        half = len(held) // 2
        return held[:half], held[half : 2 * half]

    monkeypatch.setattr(PrivacyAuditor, "candidates", halves)
    final = run("dataset=synthetic", "generator.training_epochs=20")["final"]
    nodes = int(final["partition/num_nodes"])
    for attack in ATTACKS:
        auc = final[f"privacy/mia/{attack}/auc"]
        assert abs(auc - 0.5) < 3 * null_sd(final, attack, nodes), (attack, auc)


def test_no_audit_unless_asked(run_config: Callable[..., dict]) -> None:
    """``eval.privacy_every=0`` (the default) logs no ``privacy/*`` key."""
    final = run_config(*QUICK, "federation.rounds=1", "generator=none",
                       "checkpoint.every=0")["final"]
    assert not [k for k in final if k.startswith("privacy/")]
