"""Run-folder rules of ``resume=true`` and of interrupts (DESIGN.md, "A run never destroys an
earlier result"): whether a folder holds a run, how a resumed job goes on (from its checkpoint,
from round 0, or not at all), and the one-line interrupt message with the command that
continues the run, or the whole sweep."""

import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from flcore import checkpoint
from flcore.config import Config, ScheduleScope
from flcore.errors import CheckpointError
from flcore.tracking import ResumePoint

log = logging.getLogger(__name__)


def read_results(run_dir: Path) -> dict[str, Any] | None:
    """The run folder's results.json, or None when absent or unreadable."""
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds a run: checkpoints, or results of a run that got past
    its checks (a run refused before any round leaves only a ``failed`` stub)."""
    if checkpoint.checkpoints(run_dir):
        return True
    previous = read_results(run_dir)
    return previous is not None and (previous.get("status") != "failed"
                                     or bool(previous.get("rounds")))


def sweep_folder() -> Path | None:
    """The sweep's folder when this job is one of a multirun's (``-m``), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).absolute()


def check_resume(resumed: dict[str, Any], results_config: dict[str, Any], config: Config,
                 run_dir: Path) -> None:
    """Refuse a resume that could not continue the run exactly, with the reason."""
    checkpoint.check_config(resumed["config"], results_config)
    rounds, done = config.federation.rounds, resumed["round"]
    if done > rounds:
        raise CheckpointError(f"federation.rounds={rounds}: {run_dir} already ran {done} rounds; "
                              f"resume with federation.rounds>={done}")
    saved_rounds = resumed["config"]["federation"]["rounds"]
    if (config.generator.enabled and saved_rounds != rounds
            and config.generator.schedule_scope is ScheduleScope.whole_run):
        raise CheckpointError(f"federation.rounds={rounds}: generator.schedule_scope=whole_run "
                              f"spreads the beta schedule over the run's {saved_rounds} rounds, "
                              f"so its length cannot change on resume; resume with "
                              f"federation.rounds={saved_rounds} or start a new run")
    if not resumed.get("optimizer_state", True):
        raise CheckpointError(f"{run_dir}: its checkpoints were saved with "
                              "checkpoint.optimizer_state=false, so a resume could not be exact; "
                              "start a new run (or save with checkpoint.optimizer_state=true)")


@dataclass
class Resume:
    """How a ``resume=true`` job goes on: ``finished`` holds the results.json of a run that
    already completed (returned as it is); else from ``checkpoint``; else (both None) from
    round 0. ``previous_total`` is the earlier jobs' ``total_s`` that a checkpoint continues."""

    checkpoint: dict[str, Any] | None = None
    finished: dict[str, Any] | None = None
    previous_total: float = 0.0


def plan_resume(run_dir: Path, current: dict[str, Any], config: Config,
                sweeping: bool) -> Resume:
    """Continue the run in ``run_dir`` from its latest checkpoint; return a completed run's
    results untouched; restart from round 0 a run interrupted before its first checkpoint; and,
    in a sweep, run a job whose folder holds nothing yet. Anything else is refused with the
    reason (CheckpointError), as is a config that differs from the folder's run."""
    earlier = read_results(run_dir) or {}
    status = earlier.get("status")
    if checkpoint.checkpoints(run_dir):
        resumed = checkpoint.load_latest(run_dir)
        check_resume(resumed, current, config, run_dir)
        if status == "completed" and resumed["round"] == config.federation.rounds:
            log.info("%s already finished all %d rounds; nothing to do (raise "
                     "federation.rounds to continue it)", run_dir, resumed["round"])
            return Resume(finished=earlier)
        log.info("Resuming %s after round %d", run_dir, resumed["round"])
        return Resume(checkpoint=resumed,
                      previous_total=float(earlier.get("timings", {}).get("total_s", 0.0)))
    if status in ("completed", "interrupted") and earlier.get("config"):
        checkpoint.check_config(earlier["config"], current, f"the {status} run in {run_dir} "
                                                           "was started")
    if status == "completed":
        done = earlier["rounds"][-1]["round"] if earlier.get("rounds") else 0
        if done != config.federation.rounds:
            why = ("checkpoint.every=0" if config.checkpoint.every == 0 else
                   "checkpoint.keep_on_complete=false removes them once a run completes")
            raise CheckpointError(f"federation.rounds={config.federation.rounds}: {run_dir} "
                                  f"finished after round {done} without a checkpoint ({why}), "
                                  "so it cannot be continued; start a new run")
        log.info("%s already finished all %d rounds; nothing to do", run_dir, done)
        return Resume(finished=earlier)
    if status == "interrupted":
        log.info("Restarting %s from round 0: its run stopped before its first checkpoint",
                 run_dir)
        return Resume()
    if sweeping and not holds_run(run_dir):
        log.info("Starting %s: this job of the sweep has not run yet", run_dir)
        return Resume()
    raise checkpoint.missing(run_dir)


def resume_point(resumed: dict[str, Any]) -> ResumePoint:
    """The checkpoint's round and saved rows, from which the CSV tracker fills in the rows a
    kill between the checkpoint and the tracker lost."""
    return ResumePoint(resumed["round"], list(resumed["history"]),
                       list(resumed["server"].get("epoch_history", [])))


def resume_command(overrides: list[str], run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.run.dir="))]
    words = ["python", "main.py", *kept, f"hydra.run.dir={run_dir}", "resume=true"]
    return " ".join(shlex.quote(w) for w in words)


def sweep_command(sweep_dir: Path) -> str:
    """The command that continues the sweep in ``sweep_dir``: its command line (the
    ``multirun.yaml`` Hydra writes before the first job) with ``hydra.sweep.dir`` and
    ``resume=true``, which skips the completed jobs, resumes the interrupted one and runs the
    rest."""
    saved = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides
    kept = [o for o in [*saved.hydra, *saved.task] if o != "hydra.mode=MULTIRUN"
            and not o.lstrip("+~").startswith(("resume=", "hydra.sweep.dir="))]
    words = ["python", "main.py", "-m", *kept, f"hydra.sweep.dir={sweep_dir}", "resume=true"]
    return " ".join(shlex.quote(w) for w in words)


def interrupt_message(run_dir: Path, completed: int, overrides: list[str],
                      sweep_dir: Path | None = None) -> str:
    """One line: the last completed round and the command that continues the run (from round
    0 when it has no checkpoint), or, in a sweep, every job of the sweep."""
    saved = checkpoint.checkpoints(run_dir)
    where = (f" (checkpoint of round {int(saved[-1].stem.split('_')[1])})" if saved
             else ", before any checkpoint")
    if sweep_dir is not None and (sweep_dir / "multirun.yaml").is_file():
        how = "continue the sweep" if saved else "continue the sweep (this job from round 0)"
        command = sweep_command(sweep_dir)
    else:
        how = "resume" if saved else "resume (from round 0)"
        command = resume_command(overrides, run_dir)
    return f"stopped after round {completed}{where}; {how} with: {command}"
