"""Trackers: CSV rows, wandb offline runs (one per job, always finished), failed results.json."""

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from flcore.config import CsvLoggerConfig, WandbLoggerConfig
from flcore.errors import DataError
from flcore.run import run
from flcore.tracking import CsvTracker, JobInfo, ResumePoint, Trackers, WandbTracker


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_tracker_writes_a_row_per_step_and_grows_columns(tmp_path: Path) -> None:
    tracker = CsvTracker(CsvLoggerConfig(), tmp_path)
    tracker.log({"loss": 1.5}, step=1)
    tracker.log({"loss": 0.5, "global/acc": 0.75}, step=2)
    tracker.finish(failed=False)
    rows = read_csv(tmp_path / "metrics.csv")
    assert rows == [{"round": "1", "loss": "1.5", "global/acc": ""},
                    {"round": "2", "loss": "0.5", "global/acc": "0.75"}]


def test_csv_rows_are_appended_and_on_disk_after_each_log(tmp_path: Path) -> None:
    tracker = CsvTracker(CsvLoggerConfig(), tmp_path)
    path = tmp_path / "metrics.csv"
    tracker.log({"loss": 1.0, "acc": 0.5}, step=1)
    inode, before = path.stat().st_ino, path.read_bytes()
    for step in range(2, 6):
        tracker.log({"acc": step / 10, "loss": 1.0 / step}, step=step)
        after = path.read_bytes()
        assert after.startswith(before) and after.count(b"\n") == step + 1
        assert path.stat().st_ino == inode
        before = after
    assert [row["round"] for row in read_csv(path)] == ["1", "2", "3", "4", "5"]
    assert read_csv(path)[3] == {"round": "4", "loss": "0.25", "acc": "0.4"}


def test_csv_new_key_rewrites_with_the_new_column(tmp_path: Path) -> None:
    tracker = CsvTracker(CsvLoggerConfig(), tmp_path)
    path = tmp_path / "generator_metrics.csv"
    tracker.log_epoch({"generator/epoch": 1.0, "generator/loss": 2.0}, step=1)
    tracker.log_epoch({"generator/epoch": 2.0, "generator/loss": 1.5}, step=1)
    inode = path.stat().st_ino
    tracker.log_epoch({"generator/epoch": 3.0, "generator/kl": 0.25, "generator/loss": 1.0},
                      step=2)
    assert path.stat().st_ino != inode
    assert path.read_text().splitlines() == [
        "round,generator/epoch,generator/loss,generator/kl",
        "1,1.0,2.0,", "1,2.0,1.5,", "2,3.0,1.0,0.25"]
    tracker.log_epoch({"generator/epoch": 4.0, "generator/loss": 0.5}, step=2)
    assert path.read_text().splitlines()[-1] == "2,4.0,0.5,"


def test_csv_resume_keeps_rows_up_to_the_resume_round_and_then_appends(tmp_path: Path) -> None:
    first = CsvTracker(CsvLoggerConfig(), tmp_path)
    for step in range(4):
        first.log({"acc": step / 4}, step=step)
        first.log_epoch({"generator/loss": float(step)}, step=step)
    with open(tmp_path / "metrics.csv", "a") as fh:
        fh.write("4,0.")  # a row cut short when the run was killed
    resumed = CsvTracker(CsvLoggerConfig(), tmp_path, ResumePoint(2, [], []))
    assert [r["round"] for r in read_csv(tmp_path / "metrics.csv")] == ["0", "1", "2"]
    assert [r["round"] for r in read_csv(tmp_path / "generator_metrics.csv")] == ["0", "1", "2"]
    resumed.log({"acc": 0.9}, step=3)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "round,acc", "0,0.0", "1,0.25", "2,0.5", "3,0.9"]


def test_csv_resume_fills_in_the_rows_a_kill_lost_from_the_checkpoint(tmp_path: Path) -> None:
    first = CsvTracker(CsvLoggerConfig(), tmp_path)
    for step in (0, 1, 3):  # round 2's checkpoint was written, its rows were not
        first.log({"acc": step / 4}, step=step)
        first.log_epoch({"generator/epoch": float(step), "generator/loss": 1.0}, step=step)
    saved = [{"round": r, "acc": r / 4, "time/round_s": 0.5} for r in (1, 2, 3)]
    epochs = [{"round": r, "generator/epoch": float(r), "generator/loss": 2.0} for r in (1, 2, 3)]
    resumed = CsvTracker(CsvLoggerConfig(), tmp_path, ResumePoint(3, saved, epochs))
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "round,acc,time/round_s", "0,0.0,", "1,0.25,", "2,0.5,0.5", "3,0.75,"]
    assert (tmp_path / "generator_metrics.csv").read_text().splitlines() == [
        "round,generator/epoch,generator/loss", "0,0.0,1.0", "1,1.0,1.0", "2,2.0,2.0",
        "3,3.0,1.0"]
    resumed.log({"acc": 1.0}, step=4)
    assert [r["round"] for r in read_csv(tmp_path / "metrics.csv")] == ["0", "1", "2", "3", "4"]


def test_csv_resume_without_a_file_writes_the_checkpoint_rows(tmp_path: Path) -> None:
    CsvTracker(CsvLoggerConfig(), tmp_path, ResumePoint(2, [{"round": 1, "acc": 0.5},
                                                            {"round": 2, "acc": 0.75}], []))
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["round,acc", "1,0.5", "2,0.75"]
    assert not (tmp_path / "generator_metrics.csv").exists()


class Exploding:
    def log(self, metrics, step: int) -> None:
        raise AssertionError("not called")

    def finish(self, failed: bool) -> None:
        raise RuntimeError("boom")


def test_trackers_finish_all_even_if_one_raises(tmp_path: Path) -> None:
    finished = []

    class Recorder:
        def log(self, metrics, step: int) -> None: ...

        def finish(self, failed: bool) -> None:
            finished.append(failed)

    with pytest.raises(RuntimeError, match="boom"):
        Trackers([Exploding(), Recorder()]).finish(failed=True)
    assert finished == [True]


def test_wandb_offline_runs_are_separate_and_carry_group_name_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    ids = []
    for job in range(2):
        folder = tmp_path / str(job)
        tracker = WandbTracker(WandbLoggerConfig(), JobInfo(folder, "exp-sweep1", f"seed={job}"),
                               {"seed": job})
        tracker.log({"global/acc": 0.5 + job, "train/loss_mean": 2.0}, step=3)
        tracker.log({"global/acc": 0.25, "train/loss_mean": 3.0}, step=4)
        # Summaries keep the best round: max for accuracies, min for losses.
        assert dict(tracker.run.summary["global/acc"]) == {"max": 0.5 + job}
        assert dict(tracker.run.summary["train/loss_mean"]) == {"min": 2.0}
        assert (tracker.run.group, tracker.run.name) == ("exp-sweep1", f"seed={job}")
        assert tracker.run.config["seed"] == job
        ids.append(tracker.run.id)
        tracker.finish(failed=False)
        runs = list((folder / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and runs[0].name.endswith(tracker.run.id)
    assert ids[0] != ids[1]


def test_wandb_mode_env_overrides_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = WandbTracker(WandbLoggerConfig(), JobInfo(tmp_path, "g", "n"), {})
    tracker.log({"x": 1.0}, step=0)
    tracker.finish(failed=False)
    assert not (tmp_path / "wandb").exists() or not list((tmp_path / "wandb").glob("offline-*"))


def test_results_json_is_written_on_failure(make_config: Callable[..., DictConfig],
                                           tmp_path: Path) -> None:
    cfg = make_config("dataset=esc50", f"dataset.root={tmp_path / 'missing'}", "logger=[csv]")
    with pytest.raises(DataError):
        run(cfg, run_dir=tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed"
    assert "folder not found" in results["error"]
    assert results["config"]["dataset"]["name"] == "esc50"
    assert results["timings"]["total_s"] > 0


def test_run_in_process_writes_partition_results(make_config: Callable[..., DictConfig],
                                                 tmp_path: Path) -> None:
    payload = run(make_config("logger=[csv]", "federation.rounds=1"), run_dir=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == json.loads(json.dumps(payload))
    assert results["status"] == "completed"
    assert set(results) >= {"experiment", "config", "final", "rounds", "timings", "environment"}
    assert results["partition"]["num_nodes"] == 5
    assert results["final"]["partition/train_clips"] == 240
    assert [n["train"] for n in results["partition"]["nodes"]] == [48] * 5
    rows = read_csv(tmp_path / "metrics.csv")
    assert len(rows) == 2 and rows[0]["partition/num_classes"] == "10"
    assert results["embeddings"]["audio_shape"] == [400, 8, 1024]
    assert results["embeddings"]["text_shape"] == [10, 384]
    assert results["timings"]["embedding_s"] > 0


def test_mfcc_run_reports_its_shapes_and_reuses_the_cache(
        make_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    overrides = ("logger=none", "audio_encoder=mfcc", "audio_encoder.tokens=4",
                 "federation.rounds=1",
                 f"embeddings.cache_dir={tmp_path / 'emb'}")
    first = run(make_config(*overrides), run_dir=tmp_path / "a")["embeddings"]
    second = run(make_config(*overrides), run_dir=tmp_path / "b")["embeddings"]
    assert first["audio_shape"] == [400, 4, 120]
    assert (first["audio_cached"], second["audio_cached"]) == (False, True)
    bypass = run(make_config(*overrides, "embeddings.cache=false"), run_dir=tmp_path / "c")
    assert bypass["embeddings"]["audio_cached"] is False
