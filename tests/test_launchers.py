"""Sweep launchers: joblib (local parallel), submitit (local, and SLURM by config), and the check
that a sweep's jobs can get the GPUs they ask for before any job starts."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONFIGS, SWEEP_JOB
from flcore.sweep import launcher_error

FAST = SWEEP_JOB
JOBLIB = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
BETA = "generator.beta_warmup_ratio"

Run = Callable[..., subprocess.CompletedProcess]


def sweep_folder(tmp_path: Path) -> Path:
    (sweep,) = (tmp_path / "outputs" / "default" / "multiruns").iterdir()
    return sweep


def results(sweep: Path, job: int) -> dict:
    return json.loads((sweep / str(job) / "results.json").read_text())


def test_joblib_sweep_runs_jobs_in_reused_worker_processes(run_main: Run, tmp_path: Path) -> None:
    # Three jobs on two workers: job 2 runs in a worker that already ran a job, and must give
    # job 0's numbers. choice(...) keeps the run names out of the command line wandb records.
    done = run_main(*JOBLIB, *FAST, "logger=[csv,wandb]", f"{BETA}=choice(0.25,1.0,0.25)")
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = sweep_folder(tmp_path)
    assert (sweep / "multirun.yaml").is_file()
    assert "JoblibLauncher" in (sweep / "multirun.yaml").read_text()
    jobs = [results(sweep, job) for job in range(3)]
    assert [j["status"] for j in jobs] == ["completed"] * 3
    assert [j["config"]["generator"]["beta_warmup_ratio"] for j in jobs] == [0.25, 1.0, 0.25]
    assert jobs[2]["final"] == jobs[0]["final"] != jobs[1]["final"]
    for job, name in enumerate(["beta_warmup_ratio=0.25", "beta_warmup_ratio=1.0",
                                "beta_warmup_ratio=0.25"]):
        assert (sweep / str(job) / "metrics.csv").is_file()
        (run_file,) = (sweep / str(job)).glob("wandb/offline-run-*/run-*.wandb")
        data = run_file.read_bytes()
        other = "beta_warmup_ratio=1.0" if name.endswith("0.25") else "beta_warmup_ratio=0.25"
        assert name.encode() in data and other.encode() not in data, job  # the run's name
        assert f"default-{sweep.name}".encode() in data  # the sweep's group


def test_joblib_sweep_lists_a_failed_job_and_exits_1(run_main: Run, tmp_path: Path) -> None:
    done = run_main(*JOBLIB, *FAST, f"{BETA}=0.5,1.5")
    assert done.returncode == 1, done.stderr[-3000:]
    sweep = sweep_folder(tmp_path)
    assert [results(sweep, job)["status"] for job in (0, 1)] == ["completed", "failed"]
    assert (f"1 of 2 jobs did not complete (sweep outputs/default/multiruns/{sweep.name}):\n"
            f"  job 1 (failed) {BETA}=1.5: ConfigError: {BETA}=1.5: must be in (0, 1]"
            in done.stderr), done.stderr[-3000:]


def test_submitit_local_runs_a_sweep_without_slurm(run_main: Run, tmp_path: Path) -> None:
    # Its jobs start at once, each on every CPU it sees: threads=1 keeps them from contending.
    done = run_main("-m", "hydra/launcher=submitit_local", *FAST, "threads=1", f"{BETA}=0.5,1.0")
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = sweep_folder(tmp_path)
    assert [results(sweep, job)["status"] for job in (0, 1)] == ["completed"] * 2
    assert (sweep / ".submitit").is_dir() and (sweep / "multirun.yaml").is_file()


def test_the_slurm_launcher_config_composes(run_main: Run) -> None:
    done = run_main("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra",
                    "-p", "hydra.launcher")
    assert done.returncode == 0, done.stderr
    launcher = OmegaConf.create(done.stdout)
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert launcher.max_num_timeout == 0 and launcher.timeout_min > 60


def test_the_slurm_config_becomes_an_sbatch_script(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The parameters reach sbatch as the launcher passes them (submitit only wants an ``srun``
    on PATH to build the script)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    params = {k: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v
              for k, v in cfg.hydra.launcher.items()
              if k not in ("_target_", "submitit_folder", "name", "max_num_timeout")}
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit x",
                                                           "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --time=240",
                 "export OMP_NUM_THREADS=8"):
        assert line in script, script


def test_a_sweep_asking_for_missing_gpus_stops_before_any_job(
        run_main: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever the machine has
    done = run_main(*JOBLIB, "device=cuda", "seed=0,1", "logger=none")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: device=cuda: each job needs 1 GPU but this machine has 0 "
        "(CUDA_VISIBLE_DEVICES=''); use device=cpu or device=auto, or run the sweep where "
        "there are GPUs (hydra/launcher=slurm)"]
    assert not (tmp_path / "outputs").exists()


def launcher(target: str, **params: object) -> dict:
    return {"_target_": f"hydra_plugins.{target}", **params}


JOBLIB_2 = launcher("hydra_joblib_launcher.joblib_launcher.JoblibLauncher", n_jobs=2,
                    backend=None, prefer="processes", require=None)
LOCAL = launcher("hydra_submitit_launcher.submitit_launcher.LocalLauncher", gpus_per_node=None)
SLURM = launcher("hydra_submitit_launcher.submitit_launcher.SlurmLauncher", gpus_per_node=0,
                 gres=None, gpus_per_task=None)
BASIC = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}
SEEDS = ["seed=0,1"]


@pytest.mark.parametrize(("hydra_launcher", "task", "keys", "gpus", "error"), [
    # Jobs share the GPUs: device=cuda fits as long as one exists.
    (JOBLIB_2, SEEDS, {"device": "cuda"}, 1, None),
    (JOBLIB_2, SEEDS, {"device": "cuda"}, 0,
     "device=cuda: each job needs 1 GPU but this machine has 0"),
    (BASIC, ["device=cpu,cuda:1"], {"device": "cpu"}, 1,
     "device=cuda:1: each job needs 2 GPUs but this machine has 1"),
    # Ray reservations of the jobs that run at once add up.
    (JOBLIB_2, SEEDS, {"executor": {"num_gpus": 1}}, 1,
     "executor.num_gpus=1 with hydra.launcher.n_jobs=2: the 2 jobs that run at once reserve 2 "
     "GPUs but this machine has 1; lower hydra.launcher.n_jobs to 1 or executor.num_gpus to 0.5"),
    (JOBLIB_2, SEEDS, {"executor": {"num_gpus": 0.5}}, 1, None),
    (JOBLIB_2, [], {"executor": {"num_gpus": 1}}, 1, None),  # one job: nothing runs beside it
    (JOBLIB_2, SEEDS, {"executor": {"num_gpus": 2}}, 1,
     "executor.num_gpus=2: each job needs 2 GPUs but this machine has 1"),
    ({**JOBLIB_2, "prefer": "threads"}, SEEDS, {}, 0,
     "hydra.launcher: joblib would run the jobs in threads"),
    # submitit_local hides the GPUs unless gpus_per_node says how many each job sees.
    (LOCAL, SEEDS, {"device": "cuda"}, 1,
     "device=cuda: each job needs 1 GPU but hydra/launcher=submitit_local shows it "
     "hydra.launcher.gpus_per_node=null (its jobs' CUDA_VISIBLE_DEVICES); set "
     "hydra.launcher.gpus_per_node=1"),
    ({**LOCAL, "gpus_per_node": 1}, SEEDS, {"device": "cuda"}, 1, None),
    # SLURM: what the job gets on its node, not what the submitting machine has.
    (SLURM, SEEDS, {"device": "cuda"}, 0,
     "device=cuda: each job needs 1 GPU but SLURM gives it hydra.launcher.gpus_per_node=0; set "
     "hydra.launcher.gpus_per_node=1, or device=cpu"),
    ({**SLURM, "gpus_per_node": 1}, SEEDS, {"device": "cuda"}, 0, None),
    ({**SLURM, "gres": "gpu:a100:1"}, SEEDS, {"device": "cuda"}, 0, None),
    (SLURM, SEEDS, {"device": "auto"}, 0, None),
])
def test_launcher_gpu_checks(hydra_launcher: dict, task: list[str], keys: dict, gpus: int,
                             error: str | None) -> None:
    config = OmegaConf.create({"device": "auto", **keys,
                               "hydra": {"launcher": hydra_launcher,
                                         "overrides": {"task": task}}})
    found = launcher_error(config, device_count=gpus)
    if error is None:
        assert found is None
    else:
        assert found is not None and found.startswith(error), found


def test_run_job_leaves_no_open_wandb_run_or_cached_gpu_memory(
        make_config: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that fails with its wandb run still open: the next job of a reused joblib worker
    must find neither that run nor the job's cached CUDA memory."""
    import torch

    import flcore.run

    finished, emptied = [], []
    wandb = SimpleNamespace(run=SimpleNamespace(id="left-open"))
    wandb.finish = lambda exit_code: (finished.append(exit_code), setattr(wandb, "run", None))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    def failing_run(cfg: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(flcore.run, "run", failing_run)
    with pytest.raises(RuntimeError, match="boom"):
        flcore.run.run_job(make_config("logger=none"))
    assert finished == [1] and wandb.run is None and emptied == [True]
