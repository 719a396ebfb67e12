"""One tracking interface over ``none``, ``csv`` and ``wandb``; any subset can be active.

Every tracker logs one flat dict of scalars per step, with ``round`` as the step. A tracker is
finished exactly once, also when the run raises, so a multirun never logs job 2 into job 1's run.
"""

import csv
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Protocol

from flcore.config import CsvLoggerConfig, LoggerConfig, WandbLoggerConfig
from flcore.files import write_csv

log = logging.getLogger(__name__)

Scalars = Mapping[str, float | int]


class Tracker(Protocol):
    def log(self, metrics: Scalars, step: int) -> None: ...

    def log_epoch(self, metrics: Scalars, step: int) -> None: ...

    def log_image(self, key: str, path: Path, step: int) -> None: ...

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None: ...

    def finish(self, failed: bool) -> None: ...


@dataclass
class JobInfo:
    """Where a Hydra job writes and how its tracker runs are grouped and named."""

    run_dir: Path
    group: str
    name: str


@dataclass
class ResumePoint:
    """Where a resumed run goes on: its checkpoint's round and the rows the checkpoint saved
    (every round's, every generator epoch's), which fill in the CSV rows a kill lost."""

    round: int
    rounds: list[dict[str, Any]]
    epochs: list[dict[str, Any]]


class CsvFile:
    """A CSV of logged rows whose columns grow as new keys appear.

    Each row is appended and flushed to the OS, so a killed run keeps every logged row. The file
    is rewritten (atomically) only when a row brings a new column, and once at start when
    resuming: the rows that ``keep_rows`` rejects go, and each ``saved`` row whose ``key``
    columns match no kept row comes in, in round order. Without ``keep_rows`` the first row
    starts a new file.
    """

    def __init__(self, path: Path, keep_rows: Callable[[dict[str, str]], bool] | None,
                 saved: Sequence[Mapping[str, Any]] = (),
                 key: tuple[str, ...] = ("round",)) -> None:
        self.path = path
        self.columns: list[str] = []
        if keep_rows is None:
            return
        columns, rows = self._read() if path.is_file() else ([], [])
        kept: list[Mapping[str, Any]] = [row for row in rows if keep_rows(row)]
        present = {_key(row, key) for row in kept}
        missing = [row for row in saved if _key(row, key) not in present]
        if path.is_file() or missing:
            merged = sorted([*kept, *missing], key=lambda row: int(row["round"]))
            extra = [k for row in missing for k in row if k not in columns]
            self._rewrite(columns + list(dict.fromkeys(extra)), merged)

    def append(self, row: Mapping[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        if new:
            rows = self._read()[1] if self.columns else []
            self._rewrite(self.columns + new, [*rows, row])
            return
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, lineterminator="\n").writerow(row)

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        with open(self.path, newline="") as fh:
            reader = csv.DictReader(fh)
            return list(reader.fieldnames or []), list(reader)

    def _rewrite(self, columns: list[str], rows: list[Mapping[str, Any]]) -> None:
        write_csv(self.path, columns, rows)
        self.columns = columns


def _key(row: Mapping[str, Any], columns: tuple[str, ...]) -> tuple[str, ...]:
    """A row's ``columns`` as the CSV writes them, so that a saved row (numbers) and a read one
    (text) compare equal."""
    return tuple(str(row.get(c, "")) for c in columns)


class CsvTracker:
    """``metrics.csv``: one row per round; ``generator_metrics.csv``: one row per generator
    epoch. Columns grow as new keys appear; when resuming, rows after the checkpoint's round go
    and the checkpoint's rows that the files lack (a kill between the checkpoint and the log)
    come back, so each file holds every round and epoch exactly once."""

    def __init__(self, config: CsvLoggerConfig, run_dir: Path,
                 resume: ResumePoint | None = None) -> None:
        keep = None if resume is None else _rows_up_to(resume.round)
        self.rounds = CsvFile(run_dir / config.filename, keep,
                              resume.rounds if resume else [])
        self.epochs = CsvFile(run_dir / "generator_metrics.csv", keep,
                              resume.epochs if resume else [], ("round", "generator/epoch"))

    def log(self, metrics: Scalars, step: int) -> None:
        self.rounds.append({"round": step, **metrics})

    def log_epoch(self, metrics: Scalars, step: int) -> None:
        self.epochs.append({"round": step, **metrics})

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Images stay in the run folder; a CSV has no place for them."""

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        """Tables are written to the run folder by the run itself."""

    def finish(self, failed: bool) -> None:
        """Rows are written after every ``log``; nothing is left to flush."""


def _rows_up_to(round_: int) -> Callable[[dict[str, str]], bool]:
    """Keeps the rows logged at rounds ``<= round_``; a row whose round is unreadable (garbage
    left by a machine crash) is dropped rather than stopping the resume."""
    return lambda row: (row.get("round") or "").isdigit() and int(row["round"]) <= round_


# Run summaries (the figure a wandb table shows per run): the best round of each accuracy and
# the lowest of each loss or distance, instead of the last value. wandb applies a summary to
# exact names only, so each key is matched against these patterns when it first appears.
SUMMARIES = (("global/*", "max"), ("val/*", "max"), ("local/acc_mean", "max"), ("node*/acc", "max"),
             ("synthetic/acc", "max"), ("synthetic/prompt_acc", "max"),
             ("train/loss_mean", "min"), ("gen/fd", "min"), ("gen/mmd", "min"))


class WandbTracker:
    """A wandb run per Hydra job; ``WANDB_MODE`` from the environment overrides the mode."""

    def __init__(self, config: WandbLoggerConfig, job: JobInfo, resolved: dict[str, Any],
                 run_id: str | None = None) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or config.mode.value
        self.run = wandb.init(
            project=config.project,
            entity=config.entity,
            mode=mode,
            dir=str(job.run_dir),
            group=job.group,
            name=job.name,
            config=resolved,
            tags=list(config.tags),
            notes=config.notes,
            reinit="finish_previous",
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run.define_metric("round")
        self.run.define_metric("generator/epoch")
        self.run.define_metric("*", step_metric="round")
        self.summarized: set[str] = set()
        self.epoch_keys: set[str] = set()
        log.info("wandb run %s (%s mode) in %s", self.run.id, mode, job.run_dir / "wandb")

    def log(self, metrics: Scalars, step: int) -> None:
        for key in metrics.keys() - self.summarized:
            summary = next((s for pattern, s in SUMMARIES if fnmatch(key, pattern)), None)
            if summary is not None:
                self.run.define_metric(key, step_metric="round", summary=summary)
            self.summarized.add(key)
        self.run.log({**metrics, "round": step})

    def log_epoch(self, metrics: Scalars, step: int) -> None:
        """Generator epochs, stepped by ``generator/epoch``."""
        for key in metrics:
            if key not in self.epoch_keys and key != "generator/epoch":
                self.run.define_metric(key, step_metric="generator/epoch")
                self.epoch_keys.add(key)
        self.run.log({**metrics, "round": step})

    def log_image(self, key: str, path: Path, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path)), "round": step})

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        import wandb

        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({key: table, "round": step})

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """All active trackers behind one interface."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    @property
    def run_id(self) -> str | None:
        """The wandb run id, kept in checkpoints so that a resumed run continues the same run."""
        return next((t.run.id for t in self.trackers if isinstance(t, WandbTracker)), None)

    def log(self, metrics: Scalars, step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def log_epoch(self, metrics: Scalars, step: int) -> None:
        for tracker in self.trackers:
            tracker.log_epoch(metrics, step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        for tracker in self.trackers:
            tracker.log_image(key, path, step)

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_table(key, rows, step)

    def finish(self, failed: bool) -> None:
        """Finish every tracker, even if one of them raises; re-raise the first error."""
        errors = []
        for tracker in self.trackers:
            try:
                tracker.finish(failed)
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]


def finish_open_runs() -> None:
    """Finish, as failed, a wandb run that a job left open (its tracker failed to finish).
    Hydra's joblib launcher runs the next job in the same worker process, which must start
    without the previous job's run. Never raises: it runs while a job's error is reported."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    try:
        log.warning("Finishing wandb run %s, left open by this job", wandb.run.id)
        wandb.finish(exit_code=1)
    except Exception as err:
        log.warning("Could not finish wandb run: %s: %s", type(err).__name__, err)


def build_trackers(config: LoggerConfig, job: JobInfo, resolved: dict[str, Any],
                   resume: ResumePoint | None = None, run_id: str | None = None) -> Trackers:
    """The trackers selected by ``logger=[...]``; an empty selection logs nothing. When resuming,
    the CSV holds the rows up to ``resume.round`` and wandb continues run ``run_id``."""
    trackers: list[Tracker] = []
    if config.csv is not None:
        trackers.append(CsvTracker(config.csv, job.run_dir, resume))
    if config.wandb is not None:
        trackers.append(WandbTracker(config.wandb, job, resolved, run_id))
    return Trackers(trackers)
