"""How well an attacker's scores tell a model's training rows (members) from rows it never saw
(non-members): ROC AUC and the true-positive rate at a low false-positive rate, the measure
Carlini et al. (2022) argue for, on member and non-member sets of equal size."""

import math

import torch
from torch import Tensor

from flcore.metrics.rows import need, require

#: The false-positive rates the report gives the true-positive rate at.
FPRS = (0.01, 0.001)


def roc_auc(members: Tensor, nonmembers: Tensor) -> float:
    """P(score of a random member > score of a random non-member) + 0.5 P(tie): the area under
    the ROC curve of "member if score >= t" (the Mann-Whitney U statistic over n1 n0)."""
    need(len(members), 1, "member scores")
    need(len(nonmembers), 1, "non-member scores")
    scores = torch.cat([members, nonmembers]).double()
    require(bool(torch.isfinite(scores).all()), "attack scores must be finite")
    _, inverse, counts = scores.unique(return_inverse=True, return_counts=True)
    last = counts.cumsum(0).to(scores.dtype)
    ranks = (last - (counts - 1) / 2)[inverse]  # 1-based mid-ranks: ties share their mean
    m = len(members)
    u = ranks[:m].sum() - m * (m + 1) / 2
    return float(u / (m * len(nonmembers)))


def tpr_at_fpr(members: Tensor, nonmembers: Tensor, fpr: float) -> float:
    """The largest share of members scored above a threshold that at most ``fpr`` of the
    non-members exceed ("member if score > t"): the attack's recall when it may wrongly accuse
    at most that share of non-members. With n0 non-members, an ``fpr`` below 1/n0 allows no
    false positive at all."""
    need(len(members), 1, "member scores")
    need(len(nonmembers), 1, "non-member scores")
    allowed = math.floor(fpr * len(nonmembers) + 1e-9)
    ordered = nonmembers.double().sort(descending=True).values
    threshold = ordered[allowed] if allowed < len(ordered) else -math.inf
    return float((members.double() > threshold).double().mean())


def balance(members: Tensor, nonmembers: Tensor, generator: torch.Generator
            ) -> tuple[Tensor, Tensor]:
    """Equal-size member and non-member sets: the larger one subsampled (without replacement,
    by ``generator``) to the size of the smaller, so that AUC 0.5 is chance and the TPR at a
    given FPR is not skewed by the prior."""
    n = min(len(members), len(nonmembers))

    def pick(x: Tensor) -> Tensor:
        if len(x) == n:
            return x
        return x[torch.randperm(len(x), generator=generator)[:n].to(x.device)]

    return pick(members), pick(nonmembers)


def attack_report(members: Tensor, nonmembers: Tensor) -> dict[str, float]:
    """``auc``, ``tpr@1%fpr``, ``tpr@0.1%fpr`` and the set sizes ``members``, ``nonmembers`` of
    one attack's scores (higher: more likely a member)."""
    report = {"auc": roc_auc(members, nonmembers)}
    for fpr in FPRS:
        report[f"tpr@{fpr * 100:g}%fpr"] = tpr_at_fpr(members, nonmembers, fpr)
    report["members"] = float(len(members))
    report["nonmembers"] = float(len(nonmembers))
    return report
