"""The guard of ``fedavg+synthetic`` in plain sight: test accuracy against harmful samples, the
acceptance counters (metrics.csv, results.json, resume), the log lines, the warning without a
validation split, and the class-agnostic ``generator.model=noise`` control arm."""

import csv
import logging
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import QUICK_ROUNDS, interrupt_in_round
from flcore.clients.clientA2V import ClientA2V
from flcore.config import validate
from flcore.errors import RunInterrupted
from flcore.servers.strategies import unguarded_warnings
from flcore.servers.synthetic import SyntheticLearner
from flcore.trainmodel.generators import SyntheticShare

# Closed-form Gaussian generators: good samples in no training time, so the guard has a real
# choice to make; gen/* scoring is off where a test does not read it.
FAST = (*QUICK_ROUNDS, "generator.model=gaussian", "eval.generator_every=0")
GUARD_LINE = re.compile(r"round (\d+): synthetic fine-tuning (accepted|rejected) "
                        r"\(val acc (\d\.\d{3}) -> (\d\.\d{3})\)")


@pytest.fixture
def quick(run_config: Callable[..., dict]) -> Callable[..., dict]:
    return partial(run_config, *FAST)


def guard_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, str, str]]:
    """The guard's log lines captured so far, as (round, verdict, val before, val after)."""
    return [(int(m[1]), m[2], m[3], m[4]) for r in caplog.records
            if (m := GUARD_LINE.fullmatch(r.getMessage()))]


def metrics_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_guard_keeps_fedavgs_test_accuracy_against_harmful_samples(
        quick, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Every node labels its samples with the next class (a permutation of the labels). With
    the guard, the global adapter's test accuracy is FedAvg's of the paired run (same seed:
    same split, initialisation and client training) in every round; the class skip alone lets
    the harm through."""
    fedavg = quick("federation.rounds=2", "server.adapter_training=fedavg", folder="fedavg")
    original = ClientA2V.share_generators

    def permuted(self: ClientA2V, *args, **kwargs) -> SyntheticShare:
        share = original(self, *args, **kwargs)
        share.y = (share.y + 1) % fedavg["final"]["partition/num_classes"]
        return share

    monkeypatch.setattr(ClientA2V, "share_generators", permuted)
    with caplog.at_level(logging.INFO, logger="flcore"):
        guarded = quick("federation.rounds=2", folder="guarded")
    unguarded = quick("federation.rounds=2", "server.synthetic_guard=false", folder="unguarded")

    def test_scores(result: dict) -> list[dict[str, float]]:
        return [{k: v for k, v in row.items() if k.startswith(("global/", "node"))
                 and k.endswith("acc")} for row in result["rounds"][1:]]

    assert test_scores(guarded) == test_scores(fedavg)
    assert all(row["synthetic/skipped_classes"] < fedavg["final"]["partition/num_classes"]
               for row in guarded["rounds"][1:])  # the skip left classes: the guard chose
    assert guarded["final"]["synthetic/accepted_rounds"] == 0
    assert guarded["final"]["synthetic/acceptance_rate"] == 0
    lines = guard_lines(caplog)
    assert [(r, verdict) for r, verdict, _, _ in lines] == [(1, "rejected"), (2, "rejected")]
    for (_, _, before, _), row in zip(lines, guarded["rounds"][1:], strict=True):
        assert before == f"{row['val/acc']:.3f}"  # FedAvg's adapter, kept
    assert unguarded["final"]["synthetic/accepted_rounds"] == 2
    assert unguarded["final"]["global/acc"] < fedavg["final"]["global/acc"] - 0.1


def test_acceptance_counters_match_metrics_csv_and_survive_a_resume(
        quick, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    args = ("federation.rounds=4", "checkpoint.every=1")
    with caplog.at_level(logging.INFO, logger="flcore"):
        whole = quick(*args, folder="whole")
    rows = metrics_rows(tmp_path / "whole")[1:]
    accepted = [float(r["synthetic/accepted"]) for r in rows]
    assert 0 < sum(accepted) < len(accepted)  # both verdicts occur: the counters are tested
    assert [float(r["synthetic/accepted_rounds"]) for r in rows] == [
        sum(accepted[:i + 1]) for i in range(len(rows))]
    assert [float(r["synthetic/acceptance_rate"]) for r in rows] == pytest.approx(
        [sum(accepted[:i + 1]) / (i + 1) for i in range(len(rows))])
    final = whole["final"]
    assert final["synthetic/accepted_rounds"] == sum(accepted)
    assert final["synthetic/acceptance_rate"] == pytest.approx(sum(accepted) / len(accepted))
    verdicts = {r: v for r, v, _, _ in guard_lines(caplog)}
    assert verdicts == {i + 1: "accepted" if a else "rejected" for i, a in enumerate(accepted)}
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Final:")]
    assert (f"synthetic/accepted_rounds={sum(accepted):.4g}, "
            f"synthetic/acceptance_rate={sum(accepted) / len(accepted):.4g}") in summary

    with monkeypatch.context() as patch:
        interrupt_in_round(patch, 3)
        with pytest.raises(RunInterrupted):
            quick(*args, folder="cut")
    resumed = quick(*args, "resume=true", folder="cut")
    keys = ("synthetic/accepted_rounds", "synthetic/acceptance_rate", "global/acc")
    assert {k: resumed["final"][k] for k in keys} == {k: final[k] for k in keys}

    def counters(folder: str) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k.startswith("synthetic/")}
                for r in metrics_rows(tmp_path / folder)]

    assert counters("cut") == counters("whole")


def test_fine_tuning_without_validation_clips_warns_once(
        quick, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="flcore"):
        result = quick("federation.rounds=2", "dataset.val_folds=[]")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                  and "without validation clips" in r.getMessage()]
    assert warning.startswith("server.adapter_training=fedavg+synthetic without validation "
                              "clips (dataset.val_folds=[]): server.synthetic_guard and "
                              "server.skip_failed_classes do nothing")
    assert "give the nodes validation clips with dataset.val_folds" in warning
    assert warning in result["warnings"]
    assert guard_lines(caplog) == []  # nothing to guard with
    assert result["final"]["synthetic/accepted_rounds"] == 2


def test_the_warning_names_the_split_key_and_needs_an_unguarded_fine_tuning(
        make_config: Callable[..., object]) -> None:
    ratio = validate(make_config("dataset.split=ratio", "dataset.val_ratio=0"))
    (warning,) = unguarded_warnings(ratio, 0)
    assert "(dataset.val_ratio=0.0)" in warning and "clips with dataset.val_ratio" in warning
    assert unguarded_warnings(ratio, 10) == []
    for overrides in (["server.adapter_training=fedavg"],
                      ["server.synthetic_guard=false", "server.skip_failed_classes=false"],
                      ["federation.algorithm=local"]):
        assert unguarded_warnings(validate(make_config(*overrides)), 0) == [], overrides


def test_a_noise_run_is_guarded_and_scored_like_any_generator(
        quick, monkeypatch: pytest.MonkeyPatch) -> None:
    """``generator.model=noise`` goes the way of every generator: the server receives
    class-agnostic samples (each class's mean is the node's pooled mean of its training rows,
    within 5 standard errors), fine-tunes on them under the guard and scores them (gen/*,
    without the latent metrics)."""
    checked: list[int] = []
    receive = SyntheticLearner.receive

    def check(self: SyntheticLearner, share: SyntheticShare) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = receive(self, share)
        (node,) = [c for c in self.clients if c.node == share.node]
        real = node.generator_inputs(self.shared, self.config.generator, None).double()
        rows = x.reshape(len(x), -1).double()
        for c in y.unique():
            mine = rows[y == c]
            tolerance = 5 * real.std(0).clamp(min=1e-3) / len(mine) ** 0.5
            assert ((mine.mean(0) - real.mean(0)).abs() < tolerance).all()
        checked.append(len(y.unique()))
        return x, y

    monkeypatch.setattr(SyntheticLearner, "receive", check)
    final = quick("federation.rounds=2", "generator.model=noise", "eval.generator_every=2",
                  "generator.synthetic_samples_per_class=50")["final"]
    assert checked and min(checked) >= 2  # every node sent samples of its two classes
    assert final["synthetic/accepted_rounds"] in (0, 1, 2)
    assert 0 <= final["synthetic/acceptance_rate"] <= 1
    assert "gen/fd" in final and "gen/active_units" not in final
