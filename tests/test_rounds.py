"""What a round reports: val and best, per-node accuracies, client sampling, generator rounds and
their logging, and the meaning of ``synthetic/*``."""

import csv
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from omegaconf import DictConfig

from conftest import QUICK_ROUNDS, TINY_GENERATORS, epoch_rows
from flcore.config import validate
from flcore.servers.serverbase import clients_per_round

FAST = (*QUICK_ROUNDS, *TINY_GENERATORS)


@pytest.fixture
def quick(run_config: Callable[..., dict]) -> Callable[..., dict]:
    return partial(run_config, *FAST)



def test_val_is_scored_and_best_is_chosen_on_val(quick) -> None:
    results = quick("federation.rounds=4", "generator=none")
    rounds = results["rounds"][1:]
    assert all("val/acc" in r and "global/acc" in r for r in rounds)
    best = results["best"]
    top = max(r["val/acc"] for r in rounds)
    chosen = next(r for r in rounds if r["val/acc"] == top)
    assert best["round"] == chosen["round"]
    assert best["global/acc"] == chosen["global/acc"] and best["val/acc"] == top
    assert results["final"]["global/acc"] == rounds[-1]["global/acc"]


def test_no_val_split_gives_no_best_block(quick) -> None:
    results = quick("federation.rounds=1", "generator=none", "dataset.val_folds=[]")
    assert results["best"] == {} and "val/acc" not in results["final"]


def test_every_node_is_scored_in_the_final_round(quick) -> None:
    """With 2 of 5 nodes sampled per round, ``final`` still holds every node's accuracy of
    the final global adapter: their test-size-weighted mean is the global accuracy."""
    results = quick("federation.rounds=3", "generator=none", "federation.client_fraction=0.4")
    final = results["final"]
    assert all(r["train/clients"] == 2 for r in results["rounds"][1:])
    nodes = results["partition"]["nodes"]
    weighted = sum(final[f"node{n['node']}/acc"] * n["test"] for n in nodes)
    assert weighted / sum(n["test"] for n in nodes) == pytest.approx(final["global/acc"])
    last = results["rounds"][-1]
    assert all(f"node{n['node']}/acc" in last for n in nodes)


@pytest.mark.parametrize(("fraction", "nodes", "expected"), [
    (0.5, 5, 3), (0.3, 5, 2), (0.35, 10, 4), (0.1, 5, 1), (0.01, 5, 1), (1.0, 7, 7),
])
def test_client_fraction_rounds_half_up(make_config: Callable[..., DictConfig], fraction: float,
                                        nodes: int, expected: int) -> None:
    config = validate(make_config(f"federation.client_fraction={fraction}"))
    assert clients_per_round(config, nodes) == expected


def test_server_generators_cover_every_class_under_client_sampling(quick) -> None:
    results = quick("federation.rounds=3", "federation.client_fraction=0.4",
                    "server.generator.granularity=per_class")
    assert results["status"] == "completed"
    assert "synthetic/acc" in results["final"]


@pytest.mark.parametrize("mode", ["synthetic", "fedavg+synthetic"])
def test_train_every_is_honoured_and_epochs_never_repeat(quick, tmp_path: Path,
                                                         mode: str) -> None:
    quick("federation.rounds=4", "generator.train_every=2",
          f"server.adapter_training={mode}")
    rows = epoch_rows(tmp_path / "run")
    assert [int(r["round"]) for r in rows] == [2, 2, 4, 4]
    assert [float(r["generator/epoch"]) for r in rows] == [1, 2, 3, 4]


def test_whole_run_schedule_stays_within_its_length(quick, tmp_path: Path) -> None:
    quick("federation.rounds=5", "generator.train_every=2", "generator.schedule_scope=whole_run",
          "generator.beta_schedule=cyclical", "generator.n_cycles=1", "generator.cycle_ratio=1",
          "generator.beta_max=1")
    betas = [float(r["generator/beta"]) for r in epoch_rows(tmp_path / "run")]
    # Rounds 2 and 4 train (5 // 2 = 2 generator rounds), so one cycle spans 2 x 2 = 4 epochs.
    assert betas == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_whole_run_schedule_follows_the_rounds_under_client_sampling(quick,
                                                                     tmp_path: Path) -> None:
    """Under ``whole_run`` with client sampling, the schedule runs on the run's clock: in round r
    every sampled node is at schedule epoch ``(r - 1) x epochs + e``, whether or not it trained
    before, so the warm-up (ratio 1: the whole run) ends at beta_max in the last epoch; each
    row logs every trained node's beta."""
    quick("federation.rounds=4", "federation.client_fraction=0.4",
          "generator.schedule_scope=whole_run", "generator.beta_warmup_ratio=1",
          "generator.beta_max=2")
    rows = epoch_rows(tmp_path / "run")
    assert len(rows) == 4 * 2
    for row in rows:
        node_betas = [float(v) for k, v in row.items()
                      if k.startswith("node") and k.endswith("/generator/beta") and v != ""]
        assert len(node_betas) == 2
        expected = 2 * float(row["generator/epoch"]) / 8
        assert node_betas == pytest.approx([expected, expected])
        assert float(row["generator/beta"]) == pytest.approx(expected)
    assert float(rows[-1]["generator/beta"]) == 2.0


def test_text_space_generators_report_prompt_accuracy_only(quick) -> None:
    final = quick("federation.rounds=1", "generator.training_data=adapter_output",
                  "server.adapter_training=fedavg")["final"]
    assert "synthetic/prompt_acc" in final and "synthetic/acc" not in final


def test_results_list_every_split_file_and_no_shared_recording(quick) -> None:
    results = quick("federation.rounds=1", "generator=none")
    partition = results["partition"]
    assert partition["shared_recordings"] == 0
    for node in partition["nodes"]:
        assert {k: len(v) for k, v in node["files"].items()} == {
            s: node[s] for s in ("train", "val", "test")}


def test_generators_are_scored_on_held_out_rows(quick, tmp_path: Path) -> None:
    results = quick("federation.rounds=3", "eval.generator_every=2")
    scored = [r["round"] for r in results["rounds"][1:] if "gen/fd" in r]
    assert scored == [2, 3]
    final = results["final"]
    assert final["gen/count"] == final["synthetic/samples"]
    assert 0 <= final["gen/active_units"] <= 4 and final["gen/kl"] >= 0
    # Which rows score them (val, else test): tests/test_server.py.
    with open(tmp_path / "run" / "generator_quality.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == results["partition"]["num_classes"]  # each class on one node
    assert (tmp_path / "run" / "plots" / "kl_per_dimension.png").stat().st_size > 1000


def test_undefined_generator_metrics_say_why(quick) -> None:
    """8 test clips per class cannot give k=10 neighbours: per class, precision is undefined
    with the reason, not made up; pooled over 80 clips it is defined. Without a val split the
    test clips are used."""
    results = quick("federation.rounds=1", "eval.prdc_k=10", "dataset.val_folds=[]")
    quality = results["generator_quality"]
    assert set(quality["held_out"].values()) == {"test"}
    assert "gen/precision" in results["final"]
    assert all(row["precision"] is None for row in quality["per_class"])
    reasons = [u["precision"] for u in quality["undefined"]["per_class"].values()]
    assert len(reasons) == results["partition"]["num_classes"]
    assert "got 8" in reasons[0], reasons[0]


def test_generator_scoring_can_be_switched_off(quick) -> None:
    final = quick("federation.rounds=1", "eval.generator_every=0")["final"]
    assert not [k for k in final if k.startswith("gen/")]
