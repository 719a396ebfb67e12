"""Hydra callbacks: a one-line error for an output folder that cannot be written (before Hydra
creates it), and at the end of a sweep the jobs that failed, with a non-zero exit."""

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from flcore.errors import FedA2VError
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


def _check_output_dir(path: str, key: str) -> None:
    try:
        require_writable_dir(Path(path), key)
    except FedA2VError as err:
        raise SystemExit(f"error: {err}") from None


class SweepReport(Callback):
    """Hydra callback (``hydra.callbacks.sweep_report``): checks the output folder before
    Hydra writes into it, and after the last job of a sweep lists the jobs that did not
    complete and exits with status 1 if there are any."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_output_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
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
