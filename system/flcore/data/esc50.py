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
    """Clips of a dataset folder and its class names (``class_names[target]``)."""

    root: Path
    clips: list[Clip]
    class_names: list[str]
    skipped: dict[str, str] = field(default_factory=dict)

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


def _file_problem(path: Path, min_seconds: float) -> str | None:
    """Why ``path`` cannot be used as a clip, or None when its header reads and it lasts at
    least ``min_seconds`` (the audio encoder's shortest input)."""
    if not path.is_file():
        return "file not found"
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as err:
        return f"unreadable audio ({err})"
    if info.frames == 0:
        return "empty file (0 samples)"
    seconds = info.frames / info.samplerate
    if seconds < min_seconds:
        return (f"too short ({seconds:.3f} s; the audio encoder needs at least "
                f"{min_seconds:.3f} s)")
    return None


def screen_files(clips: list[Clip], folder: Path, on_bad_file: OnBadFile,
                 min_seconds: float) -> tuple[list[Clip], dict[str, str]]:
    """The clips whose files under ``folder`` are usable, and the problem of each skipped one;
    with ``on_bad_file=error`` the first bad file is a DataError naming it."""
    kept, skipped = [], {}
    for clip in clips:
        problem = _file_problem(folder / clip.filename, min_seconds)
        if problem is None:
            kept.append(clip)
        elif on_bad_file is OnBadFile.error:
            raise DataError(f"{folder / clip.filename}: {problem}; fix or remove it, or set "
                            "dataset.on_bad_file=skip to leave it out")
        else:
            skipped[clip.filename] = problem
    if skipped:
        log.warning("Skipped %d unusable file(s) of %s (dataset.on_bad_file=skip): %s",
                    len(skipped), folder, ", ".join(list(skipped)[:5]))
    return kept, skipped


def load_esc50(root: str | Path, on_bad_file: OnBadFile = OnBadFile.error,
               min_seconds: float = 0.0) -> AudioDataset:
    """Read the metadata under ``root`` and check every listed WAV file's header; a clip shorter
    than ``min_seconds`` is a bad file."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset.root={root}: folder not found; " + HOW_TO_GET)
    clips, class_names = _classes(_read_metadata(root), root / "meta" / "esc50.csv")
    kept, skipped = screen_files(clips, root / "audio", on_bad_file, min_seconds)
    if not kept:
        raise DataError(f"dataset.root={root}: no usable clips")
    return AudioDataset(root=root, clips=kept, class_names=class_names, skipped=skipped)


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
