"""The federated A2V core, run for real on the bundled data (MFCC tokens for speed)."""

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import LEARNING
from flcore import checkpoint
from flcore.clients.clientA2V import ClientA2V
from flcore.clients.protocol import SharedTensors
from flcore.config import AdapterConfig
from flcore.errors import CheckpointError, ConfigError, TrainingError
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter

FAST = (*LEARNING, "generator=none", "server.adapter_training=fedavg", "checkpoint.every=1")


@pytest.fixture
def fast_run(run_config: Callable[..., dict]) -> Callable[..., dict]:
    return partial(run_config, *FAST)


def test_local_training_decreases_the_loss() -> None:
    torch.manual_seed(0)
    prompts = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    labels = torch.arange(3).repeat(20)
    tokens = torch.randn(60, 4, 8) + prompts[labels, :8, None].transpose(1, 2) * 3
    shared = SharedTensors(tokens, labels, prompts, torch.arange(3), ["a", "b", "c"])
    config = AdapterConfig(hidden_dim=32, lr=0.003, batch_size=16, dropout=0.0)
    client = ClientA2V(0, ["a", "b", "c"], torch.arange(60), torch.arange(0), torch.arange(0))
    model = AudioAdapter(8, 16, config)
    loss = AdapterLoss(config, prompts, torch.arange(3))
    first = client.train(model, shared, loss, config, 1, 1, 0).loss
    last = client.train(model, shared, loss, config, 30, 2, 0).loss
    assert last < 0.5 * first, (first, last)


def test_fedavg_run_learns_and_logs_every_round(fast_run, tmp_path: Path) -> None:
    results = fast_run("federation.rounds=6")
    final = results["final"]
    chance = 1 / final["partition/num_classes"]  # zero-shot over the federation's classes
    assert final["global/acc"] > 2 * chance, final
    assert {"global/balanced_acc", "global/macro_f1", "global/top5", "local/acc_mean",
            "node0/acc"} <= set(final)
    assert [r["round"] for r in results["rounds"]] == list(range(7))
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == 8
    assert set(results["per_class"]) == set(results["partition"]["nodes"][0]["classes"]) | {
        c for n in results["partition"]["nodes"][1:] for c in n["classes"]}
    assert (tmp_path / "run" / "confusion_matrix.png").stat().st_size > 1000


@pytest.mark.parametrize("overrides", [
    ("federation.aggregation=mean",),
    ("federation.aggregation=fedprox", "federation.fedprox_mu=0.1"),
    ("federation.aggregation=fedadam",),
    ("federation.aggregation=fedyogi",),
    ("federation.aggregation=fedadagrad",),
    ("adapter.loss=contrastive", "adapter.lr_schedule=cosine"),
    ("eval.label_space=dataset", "federation.clients_per_round=2"),
])
def test_aggregation_and_loss_variants_run(fast_run, overrides: tuple[str, ...]) -> None:
    results = fast_run("federation.rounds=2", *overrides)
    assert 0.0 <= results["final"]["global/acc"] <= 1.0
    if "federation.clients_per_round=2" in overrides:
        assert all(r["train/clients"] == 2 for r in results["rounds"][1:])


def test_local_and_centralized_reference_points(fast_run) -> None:
    local = fast_run("federation.algorithm=local", "federation.rounds=3", folder="local")
    central = fast_run("federation.algorithm=centralized", "federation.rounds=3",
                       folder="central")
    assert "local/acc_mean" in local["final"] and local["per_class"] == {}
    assert local["final"]["local/acc_mean"] > local["final"]["global/acc"]
    assert "local/acc_mean" not in central["final"]
    assert central["rounds"][-1]["train/clients"] == 1
    # Centralized training sees every class, each local adapter only its node's: on the
    # federation's merged test clips centralized must beat local, and twice chance.
    chance = 1 / central["final"]["partition/num_classes"]
    assert central["final"]["global/acc"] > max(2 * chance, local["final"]["global/acc"]), (
        central["final"], local["final"])


@pytest.mark.parametrize("rule", ["fedadam", "fedavgm"])
def test_resume_gives_exactly_the_uninterrupted_results(fast_run, tmp_path: Path,
                                                        rule: str) -> None:
    """With a server optimizer's moments in the checkpoint, resume is exact."""
    aggregation = f"federation.aggregation={rule}"
    straight = fast_run("federation.rounds=4", aggregation, folder="straight")
    fast_run("federation.rounds=2", aggregation, folder="resumed")
    resumed = fast_run("federation.rounds=4", aggregation, "resume=true", folder="resumed")
    assert resumed["final"] == straight["final"]
    assert resumed["rounds"][1:] == [
        {**r, "time/round_s": resumed["rounds"][i + 1]["time/round_s"]}
        for i, r in enumerate(straight["rounds"][1:])]
    rows = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3", "4"]


def test_local_algorithm_resumes_client_state_exactly(fast_run) -> None:
    straight = fast_run("federation.algorithm=local", "federation.rounds=3", folder="a")
    fast_run("federation.algorithm=local", "federation.rounds=1", folder="b")
    resumed = fast_run("federation.algorithm=local", "federation.rounds=3", "resume=true",
                       folder="b")
    assert resumed["final"] == straight["final"]


def test_checkpoints_are_plain_data(fast_run, tmp_path: Path) -> None:
    fast_run("federation.rounds=3", "checkpoint.keep_last=2")
    files = checkpoint.checkpoints(tmp_path / "run")
    assert [f.name for f in files] == ["round_0002.pt", "round_0003.pt"]
    state = torch.load(files[-1], weights_only=True)
    assert state["round"] == 3 and "global" in state["server"]


def test_resume_refuses_a_different_config(fast_run) -> None:
    fast_run("federation.rounds=1")
    with pytest.raises(CheckpointError, match=r"different config: adapter.lr \(0.003 -> 0.01\)"):
        fast_run("federation.rounds=2", "resume=true", "adapter.lr=0.01")


def test_clip_length_checks_may_differ_on_resume() -> None:
    """dataset.clip_seconds and dataset.strict only warn about or refuse clips at load time (a
    run checkpointed before they existed has neither); other dataset keys must match."""
    saved = {"dataset": {"name": "esc50", "train_ratio": 0.7}}
    checkpoint.check_config(saved, {"dataset": {"name": "esc50", "train_ratio": 0.7,
                                                "clip_seconds": 5.0, "strict": True}})
    with pytest.raises(CheckpointError, match=r"dataset.train_ratio \(0.7 -> 0.8\)"):
        checkpoint.check_config(saved, {"dataset": {"name": "esc50", "train_ratio": 0.8,
                                                    "clip_seconds": 5.0, "strict": False}})


def test_corrupted_checkpoint_is_named_and_earlier_one_offered(fast_run, tmp_path: Path) -> None:
    fast_run("federation.rounds=2", "checkpoint.keep_last=2")
    latest = checkpoint.checkpoints(tmp_path / "run")[-1]
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"round_0002.pt is corrupted .*resume from "
                                              r"round_0001.pt"):
        fast_run("federation.rounds=3", "checkpoint.keep_last=2", "resume=true")
    latest.unlink()
    assert fast_run("federation.rounds=3", "resume=true")["status"] == "completed"


def test_checkpoint_of_another_format_is_refused_in_one_line(fast_run, tmp_path: Path) -> None:
    """A checkpoint written before the format number existed (an older FedA2V) is refused
    before anything is loaded from it; the same file with the current format resumes."""
    fast_run("federation.rounds=1")
    (latest,) = checkpoint.checkpoints(tmp_path / "run")
    saved = torch.load(latest, weights_only=True)
    del saved["format"]
    torch.save(saved, latest)
    with pytest.raises(CheckpointError, match=r"round_0001.pt has checkpoint format 1, this "
                                              rf"FedA2V reads format {checkpoint.FORMAT}: "):
        fast_run("federation.rounds=2", "resume=true")
    torch.save({**saved, "format": checkpoint.FORMAT}, latest)
    assert fast_run("federation.rounds=2", "resume=true")["status"] == "completed"


def test_resume_without_checkpoint(fast_run) -> None:
    with pytest.raises(CheckpointError, match=r"has no checkpoint: pass hydra\.run\.dir"):
        fast_run("resume=true")


def test_nan_loss_stops_naming_node_and_round(fast_run, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"node \d+, round 1, epoch \d+: adapter loss is "
                                            r"(nan|inf)"):
        fast_run("adapter.lr=1e30", "adapter.grad_clip=0", "adapter.loss=mse",
                 "federation.local_epochs=3")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_more_clients_per_round_than_nodes(fast_run) -> None:
    with pytest.raises(ConfigError, match="clients_per_round=8: the federation has only 5"):
        fast_run("federation.clients_per_round=8")
