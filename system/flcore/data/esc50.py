"""Reader for any folder in the ESC-50 layout: ``audio/*.wav`` plus ``meta/esc50.csv``.

Works for the real ESC-50 (2000 clips, 50 classes, 44.1 kHz) and the bundled synthetic data. The
metadata and every file header are checked once at load time so that a bad file stops the run
(or is skipped and counted) before any work, not in the middle of an embedding pass.
"""

import csv
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from flcore.config import OnBadFile
from flcore.errors import DataError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("filename", "fold", "target", "category")
HOW_TO_GET = (
    "get ESC-50 from the karolpiczak/ESC-50 repository on GitHub (clone it or unpack "
    "ESC-50-master.zip) and pass dataset.root=/path/to/ESC-50-master, or run on the bundled "
    "synthetic data with dataset=synthetic"
)
CLIP_TOLERANCE_S = 0.01  # a clip this much under dataset.clip_seconds still counts as whole
ESC50_NAME = re.compile(r"^\d+-([^-]+)-[^-]+-\d+\.wav$", re.IGNORECASE)


def recording_of(filename: str) -> str:
    """The source recording of a clip named ``{fold}-{src_file}-{take}-{target}.wav``, else the
    file itself (a clip of its own recording)."""
    match = ESC50_NAME.match(filename)
    return match.group(1) if match else filename


@dataclass(frozen=True)
class Clip:
    """One row of the metadata: a WAV file, its fold, its class and its source recording.

    An empty ``src_file`` is filled from the file name (:func:`recording_of`).
    """

    filename: str
    fold: int
    target: int
    category: str
    src_file: str = ""

    def __post_init__(self) -> None:
        if not self.src_file:
            object.__setattr__(self, "src_file", recording_of(self.filename))


@dataclass
class AudioDataset:
    """Clips of a dataset folder and its class names (``class_names[target]``); ``skipped``:
    each bad file left out and why; ``short``: each kept clip shorter than the stated clip
    length, in seconds."""

    root: Path
    clips: list[Clip]
    class_names: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    short: dict[str, float] = field(default_factory=dict)

    def path(self, clip: Clip) -> Path:
        return self.root / "audio" / clip.filename

    @property
    def labels(self) -> np.ndarray:
        return np.array([c.target for c in self.clips], dtype=np.int64)

    @property
    def folds(self) -> np.ndarray:
        return np.array([c.fold for c in self.clips], dtype=np.int64)


def _read_metadata(root: Path) -> list[Clip]:
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise DataError(f"{meta} not found: dataset.root must be an ESC-50-layout folder; "
                        + HOW_TO_GET)
    with open(meta, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{meta} lacks column(s) {', '.join(missing)}: expected a header "
                            "filename,fold,target,category,esc10,src_file,take")
        clips = []
        for line, row in enumerate(reader, start=2):
            try:
                clips.append(Clip(row["filename"], int(row["fold"]), int(row["target"]),
                                  row["category"], (row.get("src_file") or "").strip()))
            except (TypeError, ValueError) as err:
                raise DataError(f"{meta}:{line}: fold and target must be integers ({err})") from err
    if not clips:
        raise DataError(f"{meta} lists no clips")
    return clips


def _classes(clips: list[Clip], meta: Path) -> tuple[list[Clip], list[str]]:
    """The clips with their targets renumbered 0..K-1 in the order of the K original targets
    present (a subset of ESC-50 keeps its original numbers), and the class names in that order."""
    by_target: dict[int, str] = {}
    for clip in clips:
        known = by_target.setdefault(clip.target, clip.category)
        if known != clip.category:
            raise DataError(f"{meta}: target {clip.target} is both '{known}' and "
                            f"'{clip.category}'; give each target one category")
    targets = sorted(by_target)
    names = [by_target[t] for t in targets]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        shared = [t for t in targets if by_target[t] == twice]
        raise DataError(f"{meta}: category '{twice}' has targets {shared}; give each category "
                        "one target")
    if targets != list(range(len(targets))):
        log.info("%s: targets %s mapped to 0..%d in that order", meta,
                 ", ".join(map(str, targets[:10])) + (", ..." if len(targets) > 10 else ""),
                 len(targets) - 1)
    index = {t: i for i, t in enumerate(targets)}
    return [replace(c, target=index[c.target]) for c in clips], names


def _file_problem(path: Path, min_seconds: float) -> tuple[str | None, float]:
    """Why ``path`` cannot be used as a clip (None when its header reads and it lasts at least
    ``min_seconds``, the audio encoder's shortest input), and its length in seconds."""
    if not path.is_file():
        return "file not found", 0.0
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as err:
        return f"unreadable audio ({err})", 0.0
    if info.frames == 0:
        return "empty file (0 samples)", 0.0
    seconds = info.frames / info.samplerate
    if seconds < min_seconds:
        return (f"too short ({seconds:.3f} s; the audio encoder needs at least "
                f"{min_seconds:.3f} s)"), seconds
    return None, seconds


class Screened(NamedTuple):
    """The usable clips, each skipped file's problem, and the length in seconds of each usable
    clip shorter than the dataset's stated clip length."""

    kept: list[Clip]
    skipped: dict[str, str]
    short: dict[str, float]


def _is_short(seconds: float, clip_seconds: float | None) -> bool:
    """Whether a clip of ``seconds`` falls short of the stated ``clip_seconds`` by more than
    :data:`CLIP_TOLERANCE_S` (resampling rounding is not truncation)."""
    return clip_seconds is not None and seconds < clip_seconds - CLIP_TOLERANCE_S


def screen_files(clips: list[Clip], folder: Path, *, on_bad_file: OnBadFile, min_seconds: float,
                 clip_seconds: float | None = None, strict: bool = False) -> Screened:
    """Screen the clips' files under ``folder``: with ``on_bad_file=error`` the first bad file
    is a DataError naming it (else it is skipped); a usable clip shorter than ``clip_seconds``
    (a truncated file) is a warning naming it, or with ``strict`` a DataError."""
    kept, skipped, short = [], {}, {}
    for clip in clips:
        path = folder / clip.filename
        problem, seconds = _file_problem(path, min_seconds)
        if problem is not None and on_bad_file is OnBadFile.error:
            raise DataError(f"{path}: {problem}; fix or remove it, or set "
                            "dataset.on_bad_file=skip to leave it out")
        if problem is not None:
            skipped[clip.filename] = problem
            continue
        if _is_short(seconds, clip_seconds) and strict:
            raise DataError(f"{path}: {seconds:.3f} s, shorter than dataset.clip_seconds="
                            f"{clip_seconds:g} (truncated?); re-export or remove it, or set "
                            "dataset.strict=false to keep it with a warning")
        if _is_short(seconds, clip_seconds):
            short[clip.filename] = round(seconds, 3)
        kept.append(clip)
    if skipped:
        log.warning("Skipped %d unusable file(s) of %s (dataset.on_bad_file=skip): %s",
                    len(skipped), folder, ", ".join(list(skipped)[:5]))
    if short:
        log.warning("%d clip(s) of %s shorter than dataset.clip_seconds=%g (truncated?), kept "
                    "(dataset.strict=true refuses them): %s", len(short), folder, clip_seconds,
                    ", ".join(f"{name} ({s:.3f} s)" for name, s in list(short.items())[:5]))
    return Screened(kept, skipped, short)


def load_esc50(root: str | Path, *, on_bad_file: OnBadFile = OnBadFile.error,
               min_seconds: float = 0.0, clip_seconds: float | None = None,
               strict: bool = False) -> AudioDataset:
    """Read the metadata under ``root`` and screen every listed WAV file's header
    (:func:`screen_files`); a clip shorter than ``min_seconds`` is a bad file."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset.root={root}: folder not found; " + HOW_TO_GET)
    clips, class_names = _classes(_read_metadata(root), root / "meta" / "esc50.csv")
    kept, skipped, short = screen_files(clips, root / "audio", on_bad_file=on_bad_file,
                                        min_seconds=min_seconds, clip_seconds=clip_seconds,
                                        strict=strict)
    if not kept:
        raise DataError(f"dataset.root={root}: no usable clips")
    return AudioDataset(root=root, clips=kept, class_names=class_names, skipped=skipped,
                        short=short)


def load_waveform(path: Path, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform of ``path`` at ``sample_rate`` (channels averaged, resampled)."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as err:
        raise DataError(f"{path}: unreadable audio ({err})") from err
    if not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or infinite samples; re-export the file")
    if data.size and np.abs(data).max() > 1.0:
        raise DataError(f"{path}: samples outside [-1, 1] (clipped float audio, peak "
                        f"{np.abs(data).max():.3g}); re-export it normalized")
    wave = torch.from_numpy(data.mean(axis=1))
    if rate != sample_rate:
        wave = AF.resample(wave, rate, sample_rate)
    return wave
