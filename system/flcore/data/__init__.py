"""Datasets, node partitions and the embedding cache."""

from pathlib import Path
from typing import Any

from flcore.config import DatasetConfig, DatasetName
from flcore.data import synthetic
from flcore.data.esc50 import AudioDataset, Clip, load_esc50, load_waveform
from flcore.data.folder import FolderDataset, check_split, load_folder

__all__ = ["AudioDataset", "Clip", "FolderDataset", "load_dataset", "load_waveform"]


def load_dataset(config: DatasetConfig, cache_dir: str | Path, *,
                 min_seconds: float = 0.0) -> AudioDataset:
    """The dataset the config names (the synthetic one generated on first use); clips shorter
    than ``min_seconds`` are bad files, and clips shorter than ``dataset.clip_seconds`` a
    warning (an error with ``dataset.strict``)."""
    screening: dict[str, Any] = {"on_bad_file": config.on_bad_file, "min_seconds": min_seconds,
                                 "clip_seconds": config.clip_seconds, "strict": config.strict}
    if config.name is DatasetName.folder:
        dataset = load_folder(config.root, config.csv, **screening)
        check_split(dataset, config)
        return dataset
    if config.name is DatasetName.synthetic:
        if config.root is None:
            root = synthetic.ensure_dataset(Path(cache_dir), config.synthetic)
        else:
            root = Path(config.root).expanduser()
            if not (root / "meta" / "esc50.csv").is_file():
                synthetic.write_dataset(root, config.synthetic)
        return load_esc50(root, **screening)
    return load_esc50(config.root, **screening)
