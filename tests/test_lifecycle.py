"""Runs that never lose a result: sweeps with a bad job, refused resumes, occupied folders,
interrupts, checkpoint switches and filesystem trouble."""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from conftest import (
    ADAPTERS_ONLY,
    HANG_GUARD_S,
    QUICK,
    REPO,
    SMALL_DATASET,
    TINY_GENERATORS,
    interrupt_in_round,
)
from flcore import checkpoint
from flcore.errors import CheckpointError, ConfigError, RunInterrupted
from flcore.run import run
from flcore.tracking import CsvTracker

FAST = ADAPTERS_ONLY
FAST_CLI = (*QUICK, "federation.local_epochs=1", "checkpoint.every=1", SMALL_DATASET)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (main.log aside: refusals are logged)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "main.log"}


@pytest.fixture
def fast_run(run_config: Callable[..., dict]) -> Callable[..., dict]:
    return partial(run_config, *FAST)


def test_a_bad_job_does_not_stop_the_sweep(run_main, tmp_path: Path) -> None:
    proc = run_main("-m", *FAST_CLI, "federation.rounds=1", "generator.training_epochs=2",
                    "generator.beta_warmup_ratio=1.5,0.5")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    sweep = next((tmp_path / "outputs" / "default" / "multiruns").iterdir())
    first = json.loads((sweep / "0" / "results.json").read_text())
    second = json.loads((sweep / "1" / "results.json").read_text())
    assert first["status"] == "failed" and "must be in (0, 1]" in first["error"]
    assert second["status"] == "completed" and "global/acc" in second["final"]
    assert "error: generator.beta_warmup_ratio=1.5: must be in (0, 1]" in proc.stdout
    summary = proc.stderr[proc.stderr.index("1 of 2 jobs did not complete"):]
    assert ("job 0 (failed) generator.beta_warmup_ratio=1.5: ConfigError: "
            "generator.beta_warmup_ratio=1.5: must be in (0, 1]") in summary
    assert "job 1" not in summary


def test_a_refused_resume_leaves_the_folder_as_it_was(run_main, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    args = (*FAST_CLI, "generator=none", f"hydra.run.dir={folder}")
    assert run_main(*args, "federation.rounds=2").returncode == 0
    before = snapshot(folder)
    assert ".hydra/config.yaml" in before and "checkpoints/round_0002.pt" in before
    proc = run_main(*args, "federation.rounds=3", "resume=true", "adapter.lr=0.01")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: the checkpoint was written under a different config: adapter.lr")
    assert snapshot(folder) == before
    latest = folder / "checkpoints" / "round_0002.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    corrupted = snapshot(folder)
    proc = run_main(*args, "federation.rounds=3", "resume=true")
    assert "round_0002.pt is corrupted" in proc.stderr.strip().splitlines()[-1]
    assert snapshot(folder) == corrupted


def test_a_new_run_refuses_a_folder_that_holds_one(fast_run, tmp_path: Path) -> None:
    first = fast_run("federation.rounds=2")
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"already holds a run; pass resume=true"):
        fast_run("federation.rounds=2", "seed=1")
    assert snapshot(tmp_path / "run") == before
    with pytest.raises(CheckpointError, match=r"federation.rounds=1: .* already ran 2 rounds"):
        fast_run("federation.rounds=1", "resume=true")
    again = fast_run("federation.rounds=2", "resume=true")
    assert again["timings"] == first["timings"] and again["final"] == first["final"]
    assert snapshot(tmp_path / "run") == before


def csv_rows(path: Path) -> list[dict[str, str]]:
    """A CSV's rows without its timing columns (they differ between two runs of one seed)."""
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if not k.startswith("time/")}
                for row in csv.DictReader(fh)]


def interrupt_before_log(monkeypatch: pytest.MonkeyPatch, round_: int) -> None:
    """Make the CSV tracker raise Ctrl-C as it is about to log ``round_`` (after its
    checkpoint, before its row): a kill in that gap."""
    log = CsvTracker.log

    def interrupted(self: CsvTracker, metrics: dict, step: int) -> None:
        if step == round_:
            raise KeyboardInterrupt
        log(self, metrics, step)

    monkeypatch.setattr(CsvTracker, "log", interrupted)


def test_a_kill_between_checkpoint_and_log_loses_no_row(
        fast_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("generator=per_class", *TINY_GENERATORS, "eval.generator_every=0",
            "server.adapter_training=fedavg", "federation.rounds=2")
    fast_run(*args, folder="whole")
    with monkeypatch.context() as patch:
        interrupt_before_log(patch, 1)
        with pytest.raises(RunInterrupted, match=r"stopped after round 1 \(checkpoint of round 1"):
            fast_run(*args, folder="cut")
    assert [r["round"] for r in csv_rows(tmp_path / "cut" / "metrics.csv")] == ["0"]
    fast_run(*args, "resume=true", folder="cut")
    for name in ("metrics.csv", "generator_metrics.csv"):
        rows = csv_rows(tmp_path / "cut" / name)
        assert rows == csv_rows(tmp_path / "whole" / name), name
    assert [r["round"] for r in csv_rows(tmp_path / "cut" / "metrics.csv")] == ["0", "1", "2"]
    assert len(csv_rows(tmp_path / "cut" / "generator_metrics.csv")) == 4


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_round_0(
        run_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "run"
    args = (*FAST[:-1], "checkpoint.every=5", "federation.rounds=3")
    with monkeypatch.context() as patch:
        interrupt_before_log(patch, 2)
        with pytest.raises(RunInterrupted) as stopped:
            run_config(*args)
    assert str(stopped.value) == (f"stopped after round 2, before any checkpoint; resume (from "
                                  f"round 0) with: python main.py hydra.run.dir={folder} "
                                  "resume=true")
    assert json.loads((folder / "results.json").read_text())["status"] == "interrupted"
    assert [r["round"] for r in csv_rows(folder / "metrics.csv")] == ["0", "1"]
    before = snapshot(folder)
    with pytest.raises(ConfigError, match=r"already holds a run; pass resume=true"):
        run_config(*args)
    with pytest.raises(CheckpointError, match=r"the interrupted run in .* was started under a "
                                              r"different config: adapter\.lr"):
        run_config(*args, "resume=true", "adapter.lr=0.01")
    assert snapshot(folder) == before
    resumed = run_config(*args, "resume=true")
    assert resumed["status"] == "completed"
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3]
    assert [r["round"] for r in csv_rows(folder / "metrics.csv")] == ["0", "1", "2", "3"]


def test_resuming_a_run_finished_without_checkpoints(fast_run, tmp_path: Path) -> None:
    fast_run("federation.rounds=1", "checkpoint.every=0")
    before = snapshot(tmp_path / "run")
    again = fast_run("federation.rounds=1", "checkpoint.every=0", "resume=true")
    assert again == json.loads((tmp_path / "run" / "results.json").read_text())
    with pytest.raises(CheckpointError, match=r"federation.rounds=2: .* finished after round 1 "
                                              r"without a checkpoint"):
        fast_run("federation.rounds=2", "checkpoint.every=0", "resume=true")
    with pytest.raises(CheckpointError, match=r"the completed run in .* was started under a "
                                              r"different config: seed"):
        fast_run("federation.rounds=1", "checkpoint.every=0", "resume=true", "seed=1")
    assert snapshot(tmp_path / "run") == before


def test_an_interrupted_sweep_continues_with_one_command(run_main, tmp_path: Path) -> None:
    # SIGTERM arrives in job 1 right after its round 2 is logged (a preempted sweep).
    wrapper = tmp_path / "preempted_main.py"
    wrapper.write_text(
        "import os, runpy, signal\n"
        "from flcore.tracking import CsvTracker\n"
        "log = CsvTracker.log\n"
        "def log_then_stop(self, metrics, step):\n"
        "    log(self, metrics, step)\n"
        "    if step == 2 and self.rounds.path.parent.name == '1':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "CsvTracker.log = log_then_stop\n"
        f"runpy.run_path({str(REPO / 'main.py')!r}, run_name='__main__')\n")
    stopped = run_main(*FAST_CLI, "generator=none", "federation.rounds=3", "seed=0,1,2", "-m",
                       script=wrapper)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    line = stopped.stderr.strip().splitlines()[-1]
    sweep = next((tmp_path / "outputs" / "default" / "multiruns").iterdir()).absolute()
    assert line.startswith("interrupted: stopped after round 2 (checkpoint of round 2); "
                           "continue the sweep with: python main.py -m "), line
    assert line.endswith(f" seed=0,1,2 hydra.sweep.dir={sweep} resume=true"), line
    assert not (sweep / "2").exists()
    first = (sweep / "0" / "results.json")
    done_bytes, done_time = first.read_bytes(), first.stat().st_mtime_ns
    cut = json.loads((sweep / "1" / "results.json").read_text())
    assert cut["status"] == "interrupted" and len(cut["rounds"]) == 3
    again = run_main(*shlex.split(line.split(" with: ")[1])[2:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert (first.read_bytes(), first.stat().st_mtime_ns) == (done_bytes, done_time)
    resumed = json.loads((sweep / "1" / "results.json").read_text())
    assert resumed["rounds"][:3] == cut["rounds"]
    assert f"Resuming {sweep / '1'} after round 2" in (sweep / "1" / "main.log").read_text()
    for job in range(3):
        assert json.loads((sweep / str(job) / "results.json").read_text())["status"] == (
            "completed")
        rounds = [r["round"] for r in csv_rows(sweep / str(job) / "metrics.csv")]
        assert rounds == ["0", "1", "2", "3"], job


def test_timings_add_up_over_a_resume(fast_run) -> None:
    first = fast_run("federation.rounds=1")
    resumed = fast_run("federation.rounds=2", "resume=true")
    assert resumed["timings"]["total_s"] > first["timings"]["total_s"]
    assert resumed["timings"]["rounds_s"] == pytest.approx(
        sum(r["time/round_s"] for r in resumed["rounds"][1:]))


def test_sigterm_stops_with_the_resume_command(cache_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    env = {**os.environ, "FEDA2V_CACHE_DIR": str(cache_dir)}
    command = [sys.executable, str(REPO / "main.py"), *FAST_CLI, "generator=none",
               "federation.rounds=500", f"hydra.run.dir={folder}"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG_GUARD_S

    def saved_round() -> int:
        saved = checkpoint.checkpoints(folder)
        return int(saved[-1].stem.split("_")[1]) if saved else 0

    while saved_round() < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("interrupted: stopped after round "), line
    assert f"hydra.run.dir={folder}" in line and line.endswith("resume=true")
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "interrupted"
    done = int(line.split("after round ")[1].split()[0])
    assert [r["round"] for r in results["rounds"]] == list(range(done + 1))
    stale = folder / "checkpoints" / ".round_0009.pt.0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    resume = shlex.split(line.split("resume with: ")[1])[2:]
    finish = subprocess.run([sys.executable, str(REPO / "main.py"),
                             *[a for a in resume if not a.startswith("federation.rounds=")],
                             f"federation.rounds={done + 1}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=HANG_GUARD_S, check=False)
    assert finish.returncode == 0, finish.stderr
    assert not stale.exists()
    assert json.loads((folder / "results.json").read_text())["status"] == "completed"


def test_checkpoints_off_and_without_optimizer_state(fast_run, tmp_path: Path) -> None:
    fast_run("federation.rounds=2", "checkpoint.every=0", folder="off")
    assert checkpoint.checkpoints(tmp_path / "off") == []
    fast_run("federation.rounds=2", "federation.algorithm=local", folder="full")
    fast_run("federation.rounds=2", "federation.algorithm=local",
             "checkpoint.optimizer_state=false", folder="lean")
    full = checkpoint.checkpoints(tmp_path / "full")[-1]
    lean = checkpoint.checkpoints(tmp_path / "lean")[-1]
    assert lean.stat().st_size < full.stat().st_size
    assert "optimizer" not in torch.load(lean, weights_only=True)["server"]["clients"]["0"]
    with pytest.raises(CheckpointError, match=r"checkpoint\.optimizer_state=false, so a resume "
                                              r"could not be exact"):
        fast_run("federation.rounds=3", "federation.algorithm=local",
                 "checkpoint.optimizer_state=false", "resume=true", folder="lean")


def test_only_the_last_checkpoint_is_kept_by_default(fast_run, tmp_path: Path) -> None:
    fast_run("federation.rounds=3")
    assert [f.name for f in checkpoint.checkpoints(tmp_path / "run")] == ["round_0003.pt"]


def test_keep_on_complete_false_removes_checkpoints_only_once_the_run_completes(
        fast_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lean = ("federation.rounds=3", "checkpoint.keep_on_complete=false")
    with monkeypatch.context() as patch:
        interrupt_in_round(patch, 3)
        with pytest.raises(RunInterrupted):
            fast_run(*lean)
    assert [f.name for f in checkpoint.checkpoints(tmp_path / "run")] == ["round_0002.pt"]
    resumed = fast_run(*lean, "resume=true")
    assert resumed["status"] == "completed" and resumed["rounds"][-1]["round"] == 3
    assert checkpoint.checkpoints(tmp_path / "run") == []
    with pytest.raises(CheckpointError, match=r"checkpoint\.keep_on_complete=false removes"):
        fast_run("federation.rounds=4", "checkpoint.keep_on_complete=false", "resume=true")


def test_whole_run_schedule_refuses_a_new_length_on_resume(
        make_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    gen = (*QUICK, "federation.local_epochs=1", "checkpoint.every=1", *TINY_GENERATORS,
           "generator.schedule_scope=whole_run")
    run(make_config(*gen, "federation.rounds=2"), run_dir=tmp_path)
    with pytest.raises(CheckpointError, match="whole_run spreads the beta schedule over the "
                                              "run's 2 rounds"):
        run(make_config(*gen, "federation.rounds=4", "resume=true"), run_dir=tmp_path)


@pytest.mark.parametrize(("make_args", "line"), [
    (lambda f: [f"cache_dir={f}"], "error: cache_dir={f}: is a file, not a folder"),
    (lambda f: [f"hydra.run.dir={f}/run"], "error: hydra.run.dir={f}/run: cannot create the "
                                           "folder"),
])
def test_unusable_folders_are_one_line(run_main, tmp_path: Path, make_args, line: str) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_main(*make_args(blocker), "logger=none", "generator=none")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(line.format(f=blocker)), proc.stderr
