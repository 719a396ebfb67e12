"""Membership-inference metrics against scikit-learn's ROC and numbers worked out by hand."""

import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from flcore.metrics.membership import attack_report, balance, roc_auc, tpr_at_fpr


def test_auc_by_hand_with_ties() -> None:
    # Pairs (member, non-member): 3 > 1, 3 > 2, 2 = 2 (half), 2 > 1; 4 pairs: (1 + 1 + .5 + 1) / 4.
    assert roc_auc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.875)
    assert roc_auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_scikit_learn(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    members = torch.randint(0, 20, (37,), generator=g).double()  # many ties
    nonmembers = torch.randint(0, 20, (53,), generator=g).double() - 2
    want = roc_auc_score([1] * 37 + [0] * 53, torch.cat([members, nonmembers]).numpy())
    assert roc_auc(members, nonmembers) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_tpr_at_fpr_equals_the_roc_curve(seed: int) -> None:
    """The TPR at the last ROC point (scikit-learn's curve, "member if score >= t") whose FPR
    is at most the allowed rate, for continuous scores (no ties)."""
    g = torch.Generator().manual_seed(seed)
    members = torch.randn(500, generator=g, dtype=torch.float64) + 1
    nonmembers = torch.randn(400, generator=g, dtype=torch.float64)
    fpr, tpr, _ = roc_curve([1] * 500 + [0] * 400, torch.cat([members, nonmembers]).numpy())
    for rate in (0.01, 0.05, 0.2):
        want = max(t for f, t in zip(fpr, tpr, strict=True) if f <= rate + 1e-12)
        assert tpr_at_fpr(members, nonmembers, rate) == pytest.approx(want)


def test_tpr_at_fpr_by_hand() -> None:
    members = torch.tensor([9.0, 8.0, 5.0, 1.0])
    nonmembers = torch.tensor([7.0, 6.0, 4.0, 3.0, 2.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.5  # above 7: 9 and 8
    assert tpr_at_fpr(members, nonmembers, 0.1) == 0.5  # one false positive (7): above 6
    assert tpr_at_fpr(members, nonmembers, 0.2) == 0.75  # two (7, 6): above 4
    assert tpr_at_fpr(members, nonmembers, 1.0) == 1.0


def test_balanced_sets_and_report() -> None:
    g = torch.Generator().manual_seed(0)
    members, nonmembers = balance(torch.arange(10.0), torch.arange(100.0, 104.0), g)
    assert len(members) == len(nonmembers) == 4
    assert set(members.tolist()) <= set(range(10)) and len(set(members.tolist())) == 4
    report = attack_report(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0]))
    assert report == {"auc": 1.0, "tpr@1%fpr": 1.0, "tpr@0.1%fpr": 1.0, "members": 2.0,
                      "nonmembers": 2.0}
