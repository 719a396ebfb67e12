"""Each process's share of the CPU threads: the share itself, the CPUs a process is given, and
the threads that runs and the jobs of a parallel sweep actually use."""

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from conftest import CONFIGS
from flcore.runtime import available_cpus, thread_share
from flcore.sweep import concurrent_jobs
from test_launchers import FAST, JOBLIB, results, sweep_folder

AFFINITY = len(os.sched_getaffinity(0))


@pytest.fixture
def own_cpus(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No SLURM allocation from the caller's shell, and torch's threads restored."""
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("cpus", "sharers", "override", "expected"), [
    (2, 1, None, 2),    # a single run: every CPU
    (2, 2, None, 1),    # two joblib jobs on two cores
    (16, 3, None, 5),   # 16 // 3
    (16, 4, None, 4),
    (3, 8, None, 1),    # more jobs than CPUs: never fewer than one thread
    (2, 2, 4, 4),       # threads=4 wins over the share
    (16, 3, 1, 1),
])
def test_thread_share(cpus: int, sharers: int, override: int | None, expected: int) -> None:
    assert thread_share(cpus, sharers, override) == expected


@pytest.mark.parametrize(("env", "expected"), [
    ({}, 16),
    ({"SLURM_CPUS_PER_TASK": "4"}, 4),
    ({"SLURM_CPUS_PER_TASK": "32"}, 16),  # never more than the affinity mask
    ({"SLURM_CPUS_PER_TASK": ""}, 16),
    ({"OMP_NUM_THREADS": "8"}, 16),       # joblib's workers inherit one: not a CPU count
])
def test_available_cpus(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                        expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert available_cpus() == expected


def test_a_single_run_uses_every_cpu_unless_threads_says(
        run_config: Callable[..., dict[str, Any]], own_cpus: None) -> None:
    plain = run_config(*FAST, "logger=none", folder="plain")["environment"]
    assert (plain["cpus"], plain["concurrent_jobs"], plain["cpu_threads"]) == (
        AFFINITY, 1, AFFINITY)
    forced = run_config(*FAST, "logger=none", "threads=3", folder="forced")["environment"]
    assert (forced["cpus"], forced["concurrent_jobs"], forced["cpu_threads"]) == (AFFINITY, 1, 3)


def test_joblib_jobs_split_the_cpus(run_main: Callable, tmp_path: Path, own_cpus: None) -> None:
    done = run_main(*JOBLIB, *FAST, "seed=0,1")
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = sweep_folder(tmp_path)
    for job in (0, 1):
        env = results(sweep, job)["environment"]
        assert (env["cpus"], env["concurrent_jobs"]) == (AFFINITY, 2)
        assert env["cpu_threads"] == max(1, AFFINITY // 2)


@pytest.mark.parametrize(("launcher", "n_jobs", "sweep", "expected"), [
    ("joblib", 2, "seed=0,1,2,3", 2),
    ("joblib", 4, "seed=0,1,2", 3),    # never more at once than the sweep has jobs
    ("basic", None, "seed=0,1,2,3", 1),
])
def test_concurrent_jobs_of_a_sweep_job(tmp_path: Path, launcher: str, n_jobs: int | None,
                                        sweep: str, expected: int) -> None:
    """What a job of the sweep sees: its own overrides in its config, the sweep's in
    ``multirun.yaml``."""
    extra = [] if n_jobs is None else [f"hydra.launcher.n_jobs={n_jobs}"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        saved = compose("config", overrides=[f"hydra/launcher={launcher}", *extra],
                        return_hydra_config=True)
    with open_dict(saved):
        saved.hydra.overrides.task = [sweep]
        saved.hydra.sweep.dir = str(tmp_path)
        saved.hydra.mode = RunMode.MULTIRUN
    OmegaConf.save(saved, tmp_path / "multirun.yaml")
    job = saved.copy()
    with open_dict(job):
        job.hydra.overrides.task = ["seed=1"]
    assert concurrent_jobs() == 1  # outside Hydra: a single run
    HydraConfig.instance().set_config(job)
    try:
        assert concurrent_jobs() == expected
    finally:
        HydraConfig.instance().cfg = None
