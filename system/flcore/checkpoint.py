"""Save and resume a whole federation.

A checkpoint is plain data (tensors, numbers, strings, lists, dicts) written atomically to
``<run>/checkpoints/round_NNNN.pt`` and read with ``torch.load(weights_only=True)``: loading one
never runs code. It holds the server's and clients' state, the round, the metric history, the
RNG states and the tracker run id, plus the resolved config it was written under.
"""

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flcore.errors import CheckpointError
from flcore.files import atomic_write_bytes

# Keys that may change between a run and its resumption: how long it runs, where it logs and
# caches, on which device, and the resume switch itself.
RESUMABLE_CHANGES = ("resume", "federation.rounds", "logger", "device", "cache_dir",
                     "embeddings.cache", "embeddings.cache_dir", "embeddings.workers",
                     "embeddings.shard_size", "checkpoint", "generator.load_from", "executor",
                     "images", "dataset.clip_seconds", "dataset.strict", "threads")
#: The layout of a checkpoint's payload; raised whenever what a resume reads changes, so an older
#: run's checkpoint is refused with one line instead of failing half-way through loading it.
FORMAT = 2


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first."""
    return sorted(folder(run_dir).glob("round_*.pt"))


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as checkpoint-safe data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, python, python_gauss = random.getstate()
    return {"python": list(python), "python_version": version, "python_gauss": python_gauss,
            "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss,
                      "gauss": gauss},
            "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])


def save(run_dir: Path, round_: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``payload`` for ``round_`` atomically; keep only the ``keep`` newest files."""
    buffer = io.BytesIO()
    torch.save({**payload, "format": FORMAT, "round": round_, "rng": rng_state()}, buffer)
    path = folder(run_dir) / f"round_{round_:04d}.pt"
    atomic_write_bytes(path, buffer.getvalue())
    for old in checkpoints(run_dir)[:-keep]:
        old.unlink()
    return path


def remove_all(run_dir: Path) -> None:
    """Delete the run's checkpoints (``checkpoint.keep_on_complete=false``, once it completed)."""
    for path in checkpoints(run_dir):
        path.unlink()


def load_latest(run_dir: Path) -> dict[str, Any]:
    """The newest checkpoint of ``run_dir``; a clear error if there is none, it is corrupted or
    an older FedA2V wrote it (another :data:`FORMAT`)."""
    files = checkpoints(run_dir)
    if not files:
        raise missing(run_dir)
    latest = files[-1]
    try:
        saved = torch.load(latest, map_location="cpu", weights_only=True)
    except Exception as err:
        earlier = (f"delete it to resume from {files[-2].name}" if len(files) > 1
                   else "no earlier checkpoint is left")
        raise CheckpointError(f"{latest} is corrupted ({type(err).__name__}); {earlier}") from err
    written = saved.get("format", 1)
    if written != FORMAT:
        raise CheckpointError(f"{latest} has checkpoint format {written}, this FedA2V reads "
                              f"format {FORMAT}: finish that run with the version that wrote "
                              "it, or start a new run")
    return saved


def missing(run_dir: Path) -> CheckpointError:
    """The error of a resume whose folder has no checkpoint to continue from."""
    return CheckpointError(f"resume=true but {folder(run_dir)} has no checkpoint: pass "
                           "hydra.run.dir=<the folder of the run to resume> (a run with "
                           "checkpoint.keep_on_complete=false removes its own once it completes)")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b.c": value}``."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def check_config(saved: dict[str, Any], current: dict[str, Any],
                 written: str = "the checkpoint was written") -> None:
    """Refuse to resume under a config that differs in anything but :data:`RESUMABLE_CHANGES`;
    ``written`` says what ran under ``saved`` (the checkpoint, or a run without one)."""
    old, new = flatten(saved), flatten(current)
    differing = sorted(k for k in old.keys() | new.keys()
                       if old.get(k) != new.get(k)
                       and not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES))
    if differing:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in differing[:5])
        raise CheckpointError(f"{written} under a different config: {shown}"
                              f"{' ...' if len(differing) > 5 else ''}; resume with the "
                              "original values or start a new run")
