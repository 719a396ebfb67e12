"""Hydra callbacks: a one-line error for a single run's config that fails validation, an output
folder that cannot be written or jobs that ask for GPUs their launcher cannot give them (all
before any job starts), and at the end of a sweep the jobs that failed, with a non-zero exit."""

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flcore.config import validate
from flcore.errors import ConfigError, FedA2VError
from flcore.files import require_writable_dir

log = logging.getLogger(__name__)


def job_outcomes(sweep_dir: Path) -> list[tuple[str, str, list[str], str]]:
    """``(job folder, status, overrides, error)`` of every job folder under ``sweep_dir``; a
    job without a readable results.json counts as failed."""
    outcomes = []
    for folder in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                         key=lambda p: int(p.name)):
        try:
            results = json.loads((folder / "results.json").read_text())
        except (OSError, ValueError):
            outcomes.append((folder.name, "failed", [], "no readable results.json"))
            continue
        outcomes.append((folder.name, results.get("status", "unknown"),
                         list(results.get("environment", {}).get("overrides", [])),
                         results.get("error") or ""))
    return outcomes


def failure_report(sweep_dir: Path) -> str | None:
    """Lines naming each job that did not complete by the overrides that set it apart from the
    other jobs, with its error; None when every job completed."""
    outcomes = job_outcomes(sweep_dir)
    failed = [o for o in outcomes if o[1] != "completed"]
    if not failed:
        return None
    shared = set.intersection(*(set(o[2]) for o in outcomes))
    lines = [f"  job {name} ({status}) {','.join(o for o in overrides if o not in shared)}: "
             f"{error}" for name, status, overrides, error in failed]
    return (f"{len(failed)} of {len(outcomes)} jobs did not complete (sweep {sweep_dir}):\n"
            + "\n".join(lines))


def swept_keys(sweep_dir: Path) -> set[str]:
    """Keys that the sweep's command line varies (``key=a,b``, ``range(...)``, ``choice(...)``),
    read from the ``multirun.yaml`` Hydra writes before the first job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    saved = sweep_dir / "multirun.yaml"
    if not saved.is_file():
        return set()
    task = list(OmegaConf.load(saved).hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(task)
    return {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}


def short_name(overrides: list[str], keys: set[str] | None = None) -> str:
    """``key=value`` pairs of ``overrides`` (only ``keys`` when given) joined by commas, each key
    shortened to its last part where that stays unambiguous: ``beta_warmup_ratio=0.25,seed=1``."""
    pairs = [o.lstrip("+~").split("=", 1) for o in overrides if "=" in o]
    pairs = [(k, v) for k, v in pairs if keys is None or k in keys]
    last = [k.rsplit(".", 1)[-1] for k, _ in pairs]
    return ",".join(f"{short if last.count(short) == 1 else key}={value}"
                    for (key, value), short in zip(pairs, last, strict=True))


def _sweep_overrides(config: DictConfig) -> list[Any]:
    """The parsed command-line overrides of a sweep's config (``hydra.overrides.task``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = OmegaConf.select(config, "hydra.overrides.task", default=None) or []
    return OverridesParser.create().parse_overrides(list(task))


def sweep_values(config: DictConfig, key: str, default: Any) -> list[Any]:
    """The values ``key`` takes in the sweep's jobs: those of its sweep override
    (``device=cpu,cuda``, ``range(...)``), else the composed config's one value."""
    for override in _sweep_overrides(config):
        if override.is_sweep_override() and override.get_key_element().lstrip("+~") == key:
            try:
                return list(override.sweep_iterator())
            except Exception:  # an interval sweep (optuna & co.): values unknown in advance
                break
    return [OmegaConf.select(config, key, default=default)]


def sweep_size(config: DictConfig) -> int | None:
    """How many jobs the sweep's overrides make (None when a sweep cannot be enumerated)."""
    size = 1
    for override in _sweep_overrides(config):
        if override.is_sweep_override():
            try:
                size *= len(list(override.sweep_iterator()))
            except Exception:
                return None
    return size


def device_gpus(device: Any) -> int:
    """GPUs a ``device`` value needs to exist: ``cuda`` 1, ``cuda:N`` N + 1, others 0."""
    text = str(device)
    if not text.startswith("cuda"):
        return 0
    index = text.partition(":")[2]
    return int(index) + 1 if index.isdigit() else 1


def joblib_processes(n_jobs: Any) -> int:
    """Joblib's ``n_jobs`` as a count of processes (null = 1, -1 = every CPU, -2 = all but
    one, ...)."""
    from joblib import cpu_count

    n = 1 if n_jobs is None else int(n_jobs)
    return max(1, cpu_count() + 1 + n) if n < 0 else n


def joblib_parallelism(config: DictConfig) -> int:
    """How many jobs Hydra's joblib launcher runs at once (``n_jobs``, -1 = every CPU)."""
    n = joblib_processes(OmegaConf.select(config, "hydra.launcher.n_jobs", default=None))
    size = sweep_size(config)
    return n if size is None else max(1, min(n, size))


def concurrent_jobs() -> int:
    """How many jobs of this process's sweep run at once, itself included: the joblib
    launcher's parallelism, from the sweep's ``multirun.yaml`` (a job's own config holds only
    its own overrides; sweepers other than the basic one write none, and then ``n_jobs``
    counts); 1 for a single run and for launchers whose jobs do not share this machine's CPUs
    (basic: one job at a time; SLURM: each job has its allocation)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return 1
    hc = HydraConfig.get()
    target = str(hc.launcher.get("_target_") or "")
    if hc.mode != RunMode.MULTIRUN or not target.endswith(".JoblibLauncher"):
        return 1
    saved = Path(hc.sweep.dir) / "multirun.yaml"
    if saved.is_file():
        return joblib_parallelism(OmegaConf.load(saved))
    return joblib_processes(hc.launcher.get("n_jobs"))


def _launcher(config: DictConfig) -> str:
    """The launcher's class name: BasicLauncher, JoblibLauncher, LocalLauncher (submitit's
    local one), SlurmLauncher, ...; empty when the config has no ``hydra.launcher``."""
    target = OmegaConf.select(config, "hydra.launcher._target_", default=None) or ""
    return str(target).rsplit(".", 1)[-1]


def launcher_error(config: DictConfig, device_count: int | None = None) -> str | None:
    """Why the sweep's launcher cannot run its jobs as configured, in one line naming the keys
    and the fix, or None. Checked: the GPUs each job asks for (``device=cuda``/``cuda:N``,
    ``executor.num_gpus``) against what its launcher gives it (this machine's
    ``torch.cuda.device_count()`` for the basic and joblib launchers, ``gpus_per_node`` for
    submitit), the GPUs reserved by the joblib jobs that run at once, and joblib's thread
    backend (jobs in threads would share Hydra's global job config). ``device_count`` defaults
    to torch's count, which does not initialise CUDA in this process."""
    launcher = _launcher(config)
    if launcher not in ("BasicLauncher", "JoblibLauncher", "LocalLauncher", "SlurmLauncher"):
        return None
    parallel = joblib_parallelism(config) if launcher == "JoblibLauncher" else 1
    if parallel > 1:
        backend, prefer, require = (OmegaConf.select(config, f"hydra.launcher.{key}",
                                                     default=None)
                                    for key in ("backend", "prefer", "require"))
        if backend == "threading" or (backend is None and (prefer == "threads"
                                                           or require == "sharedmem")):
            return ("hydra.launcher: joblib would run the jobs in threads of one process, where "
                    "they share Hydra's job config (folders, logs); keep its process backend: "
                    "hydra.launcher.backend=null hydra.launcher.prefer=processes "
                    "hydra.launcher.require=null")
    device = max(sweep_values(config, "device", "auto"), key=device_gpus)
    num_gpus = max(float(g or 0) for g in sweep_values(config, "executor.num_gpus", 0))
    need = max(device_gpus(device), math.ceil(num_gpus))
    asked = " and ".join([*([f"device={device}"] if device_gpus(device) else []),
                          *([f"executor.num_gpus={num_gpus:g}"] if num_gpus > 0 else [])])
    if launcher == "SlurmLauncher":
        given = OmegaConf.select(config, "hydra.launcher.gpus_per_node", default=None)
        other = any(OmegaConf.select(config, f"hydra.launcher.{k}", default=None)
                    for k in ("gres", "gpus_per_task"))
        if need > (given or 0) and not other:
            return (f"{asked}: each job needs {_gpus(need)} but SLURM gives it "
                    f"hydra.launcher.gpus_per_node={given if given is not None else 'null'}; set "
                    f"hydra.launcher.gpus_per_node={need}, or device=cpu")
        return None
    count = _cuda_device_count() if device_count is None else device_count
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    fixes = "device=cpu or device=auto" + (", a smaller executor.num_gpus" if num_gpus else "")
    if need > count:
        where = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})"
        return (f"{asked}: each job needs {_gpus(need)} but this machine has {count}{where}; use "
                f"{fixes}, or run the sweep where there are GPUs (hydra/launcher=slurm)")
    if launcher == "LocalLauncher":
        given = OmegaConf.select(config, "hydra.launcher.gpus_per_node", default=None)
        if need > (given or 0):
            return (f"{asked}: each job needs {_gpus(need)} but hydra/launcher=submitit_local "
                    f"shows it hydra.launcher.gpus_per_node="
                    f"{given if given is not None else 'null'} (its jobs' CUDA_VISIBLE_DEVICES); "
                    f"set hydra.launcher.gpus_per_node={need}")
        if not given and count and "auto" in sweep_values(config, "device", "auto"):
            log.warning("hydra/launcher=submitit_local hides this machine's %d GPU(s) from its "
                        "jobs, so device=auto runs them on the CPU; set "
                        "hydra.launcher.gpus_per_node=1 to give each job one", count)
    if parallel > 1 and num_gpus > 0 and parallel * num_gpus > count:
        n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs", default=None)
        return (f"executor.num_gpus={num_gpus:g} with hydra.launcher.n_jobs={n_jobs}: the "
                f"{parallel} jobs that run at once reserve {parallel * num_gpus:g} GPUs but this "
                f"machine has {count}; lower hydra.launcher.n_jobs to "
                f"{max(1, int(count // num_gpus))} or executor.num_gpus to {count / parallel:g}")
    if parallel > 1 and (need or (count and "auto" in sweep_values(config, "device", "auto"))):
        log.info("%d jobs run at once and share this machine's %d GPU(s) (device=cuda is the "
                 "first visible one); lower hydra.launcher.n_jobs if they run out of GPU memory",
                 parallel, count)
    return None


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _cuda_device_count() -> int:
    """Visible CUDA devices, counted through NVML where it can: no CUDA context in this process
    (the launcher's), so its workers and jobs start clean."""
    import torch

    return torch.cuda.device_count()


def _check_output_dir(path: str, key: str) -> None:
    try:
        require_writable_dir(Path(path), key)
    except FedA2VError as err:
        raise SystemExit(f"error: {err}") from None


class SweepReport(Callback):
    """Hydra callback (``hydra.callbacks.sweep_report``): checks a single run's config and the
    output folder before Hydra creates it and, for a sweep, that its launcher can give each job
    the GPUs it asks for; after the last job of a sweep lists the jobs that did not complete and
    exits with status 1 if there are any."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:  # a refused run leaves no folder behind (a sweep's jobs keep their failed record)
            validate(config)
        except ConfigError as err:
            raise SystemExit(f"error: {err}") from None
        _check_output_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        error = launcher_error(config)
        if error is not None:  # before the folder check creates the sweep's folder
            raise SystemExit(f"error: {error}")
        _check_output_dir(config.hydra.sweep.dir, "hydra.sweep.dir")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        report = failure_report(sweep_dir)
        if report is None:
            log.info("Sweep %s: every job completed", sweep_dir)
            return
        print(report, file=sys.stderr)
        raise SystemExit(1)
