"""Reader for any labelled audio collection: class folders, or a CSV of labelled files.

Two layouts (``dataset.name=folder``):

- class folders (``dataset.csv=null``): ``root/<class name>/<file>``, files at any depth below
  their class folder; every file is its own recording;
- a CSV (``dataset.csv``) with a header ``filename,label[,split][,group]`` (the layout of
  VGGSound- and VEGAS-style exports): ``filename`` is relative to ``dataset.root`` (the CSV's
  folder when ``dataset.root`` is null); ``split`` is ``train``, ``val`` or ``test`` and becomes
  fold 1, 2 or 3 (``dataset.split=folds``); ``group`` names the recording a clip was cut from,
  so that ``dataset.split=ratio`` and the partition keep a recording's clips on one side of every
  split (the clip's ``src_file``; without it every file is its own recording).

The result is the :class:`~flcore.data.esc50.AudioDataset` the rest of the code uses: classes
are sorted by name (``target`` is the index), clips by file name. Every file header is checked
at load time with the ESC-50 reader's bad-file policy (``dataset.on_bad_file``).
"""

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from flcore.config import DatasetConfig, OnBadFile, SplitKind
from flcore.data.esc50 import AudioDataset, Clip, screen_files
from flcore.errors import DataError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aiff", ".aif")
SPLIT_FOLDS = {"train": 1, "val": 2, "test": 3}
REQUIRED_COLUMNS = ("filename", "label")
LAYOUTS = ("point dataset.root at a folder of class folders (root/<class>/<file>.wav), or "
           "dataset.csv at a CSV with a header filename,label[,split][,group]")


@dataclass
class FolderDataset(AudioDataset):
    """An :class:`AudioDataset` whose clips' file names are relative to ``root``.

    ``metadata`` is the CSV (None for class folders); ``has_splits``: the CSV has a ``split``
    column (folds 1 train, 2 val, 3 test; else every clip is in fold 0).
    """

    metadata: Path | None = None
    has_splits: bool = False

    def path(self, clip: Clip) -> Path:
        return self.root / clip.filename


def _is_audio(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(AUDIO_SUFFIXES)


def _class_folder_clips(root: Path) -> tuple[list[Clip], list[str]]:
    """Clips and sorted class names of ``root/<class>/**/<file>``."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"dataset.root={root}: no class folders in it; " + LAYOUTS)
    loose = [p.name for p in root.iterdir() if p.is_file() and _is_audio(p.name)]
    if loose:
        log.warning("Ignoring %d audio file(s) directly in %s (in no class folder), e.g. %s",
                    len(loose), root, loose[0])
    clips = []
    for target, name in enumerate(classes):
        found = []
        for folder, dirs, files in os.walk(root / name):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = Path(folder).relative_to(root)
            found += [(rel / f).as_posix() for f in files if _is_audio(f)]
        if not found:
            raise DataError(f"dataset.root={root}: class folder '{name}' holds no audio files "
                            f"({', '.join(AUDIO_SUFFIXES)}); add its files or remove the folder")
        clips += [Clip(f, 0, target, name, f) for f in found]
    clips.sort(key=lambda c: c.filename)
    return clips, classes


def _csv_clips(meta: Path) -> tuple[list[Clip], list[str], bool]:
    """Clips, sorted class names and whether a split column exists, from the CSV ``meta``."""
    with open(meta, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DataError(f"dataset.csv={meta}: no column(s) {', '.join(missing)} (header: "
                            f"{','.join(columns) or 'none'}); its first line must be a header "
                            "filename,label[,split][,group]")
        has_splits, has_groups = "split" in columns, "group" in columns
        rows, seen = [], {}
        for line, row in enumerate(reader, start=2):
            filename, label = (row.get("filename") or "").strip(), (row.get("label") or "").strip()
            if not filename or not label:
                raise DataError(f"{meta}:{line}: empty {'filename' if not filename else 'label'}; "
                                "every row needs a file and its label")
            if filename in seen:
                raise DataError(f"{meta}:{line}: {filename} is listed twice (also on line "
                                f"{seen[filename]}); list each file once")
            seen[filename] = line
            fold = 0
            if has_splits:
                value = (row.get("split") or "").strip().lower()
                if value not in SPLIT_FOLDS:
                    raise DataError(f"{meta}:{line}: split '{value}' is not one of "
                                    f"{', '.join(SPLIT_FOLDS)}; fix the row, or drop the split "
                                    "column and use dataset.split=ratio")
                fold = SPLIT_FOLDS[value]
            group = (row.get("group") or "").strip() if has_groups else ""
            rows.append((filename, fold, label, group or filename))
    if not rows:
        raise DataError(f"dataset.csv={meta}: lists no files; " + LAYOUTS)
    classes = sorted({label for _, _, label, _ in rows})
    target = {name: i for i, name in enumerate(classes)}
    clips = [Clip(f, fold, target[label], label, group) for f, fold, label, group in rows]
    clips.sort(key=lambda c: c.filename)
    return clips, classes, has_splits


def _roots(root: str | Path | None, csv_path: str | Path | None) -> tuple[Path, Path | None]:
    """The folder file names are relative to, and the CSV (None for class folders)."""
    meta = Path(csv_path).expanduser() if csv_path is not None else None
    if meta is not None and not meta.is_file():
        raise DataError(f"dataset.csv={meta}: file not found; " + LAYOUTS)
    if root is None:
        if meta is None:
            raise DataError("dataset.root=null: dataset.name=folder needs a folder; " + LAYOUTS)
        return meta.parent, meta
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DataError(f"dataset.root={folder}: folder not found; " + LAYOUTS)
    return folder, meta


def load_folder(root: str | Path | None, csv_path: str | Path | None = None, *,
                on_bad_file: OnBadFile = OnBadFile.error, min_seconds: float = 0.0,
                clip_seconds: float | None = None, strict: bool = False) -> FolderDataset:
    """Read class folders under ``root`` (``csv_path`` None) or the CSV ``csv_path`` (file names
    relative to ``root``, else to the CSV's folder), and screen every file's header
    (:func:`~flcore.data.esc50.screen_files`); a clip shorter than ``min_seconds`` is a bad
    file."""
    folder, meta = _roots(root, csv_path)
    if meta is None:
        clips, classes = _class_folder_clips(folder)
        has_splits = False
    else:
        clips, classes, has_splits = _csv_clips(meta)
    kept, skipped, short = screen_files(clips, folder, on_bad_file=on_bad_file,
                                        min_seconds=min_seconds, clip_seconds=clip_seconds,
                                        strict=strict)
    used = {clip.target for clip in kept}
    empty = [name for t, name in enumerate(classes) if t not in used]
    if empty:
        raise DataError(f"{meta or folder}: class '{empty[0]}' has no usable files (all were "
                        f"skipped{f'; {len(empty)} such classes' if len(empty) > 1 else ''}); "
                        "fix its files or remove the class")
    return FolderDataset(root=folder, clips=kept, class_names=classes, skipped=skipped,
                         short=short, metadata=meta, has_splits=has_splits)


def check_split(dataset: FolderDataset, config: DatasetConfig) -> None:
    """``dataset.split=folds`` needs the CSV's split column, and each fold list may name only
    folds the column holds (1 train, 2 val, 3 test); say so in one line."""
    if config.split is not SplitKind.folds:
        if dataset.has_splits:
            log.info("%s has a split column, which dataset.split=%s ignores (dataset.split=folds "
                     "uses it)", dataset.metadata, config.split.value)
        return
    source = dataset.metadata or dataset.root
    if not dataset.has_splits:
        raise DataError(f"dataset.split=folds: {source} has no split column, so no folds; set "
                        "dataset.split=ratio, or add a split column (train/val/test) to the CSV")
    names = {fold: name for name, fold in SPLIT_FOLDS.items()}
    present = sorted({clip.fold for clip in dataset.clips})
    for key in ("train_folds", "val_folds", "test_folds"):
        absent = [f for f in getattr(config, key) if f not in present]
        if absent:
            shown = ", ".join(names.get(f, str(f)) for f in present)
            raise DataError(f"dataset.{key}={getattr(config, key)}: {source} has no rows of "
                            f"fold(s) {absent} (its split column holds: {shown}; folds are "
                            f"1 train, 2 val, 3 test); set dataset.{key} to folds it holds"
                            f"{', or []' if key == 'val_folds' else ''}")
