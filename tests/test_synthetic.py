"""The bundled synthetic dataset: layout, determinism, caching and learnability."""

import csv
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from flcore.config import SyntheticConfig
from flcore.data import synthetic
from flcore.data.esc50 import load_esc50, load_waveform

SMALL = SyntheticConfig(clips_per_class=5, duration_s=1.0)


def test_layout_matches_esc50(cache_dir: Path) -> None:
    root = synthetic.ensure_dataset(cache_dir, SyntheticConfig())
    with open(root / "meta" / "esc50.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == list(synthetic.META_COLUMNS)
    assert len(rows) == 400
    dataset = load_esc50(root)
    assert len(dataset.class_names) >= 10
    assert all(" " not in n and n.replace("_", "").isalpha() for n in dataset.class_names)
    counts = np.zeros((len(dataset.class_names), 5), dtype=int)
    for clip in dataset.clips:
        fold, _, take, target = clip.filename.removesuffix(".wav").split("-")
        assert (int(fold), int(target), take) == (clip.fold, clip.target, "A")
        counts[clip.target, clip.fold - 1] += 1
    assert (counts == 8).all()
    info = sf.info(str(dataset.path(dataset.clips[0])))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 80000,
                                                                           "PCM_16")


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = synthetic.write_dataset(tmp_path / "a", SMALL, progress=False)
    b = synthetic.write_dataset(tmp_path / "b", SMALL, progress=False)
    c = synthetic.write_dataset(tmp_path / "c", SyntheticConfig(clips_per_class=5, duration_s=1.0,
                                                                seed=1), progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 51
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    wavs = [f for f in files if f.suffix == ".wav"]
    assert all((a / f).read_bytes() != (c / f).read_bytes() for f in wavs)


def test_ensure_dataset_generates_once(tmp_path: Path) -> None:
    root = synthetic.ensure_dataset(tmp_path, SMALL)
    meta = root / "meta" / "esc50.csv"
    before = meta.stat().st_mtime_ns
    assert synthetic.ensure_dataset(tmp_path, SMALL) == root
    assert meta.stat().st_mtime_ns == before
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_clips_vary_within_a_class_and_stay_in_range() -> None:
    clips = [synthetic.synthesize_clip(3, i, SMALL) for i in range(5)]
    peaks = [float(np.abs(c).max()) for c in clips]
    assert all(0.1 < p <= 0.71 for p in peaks)
    assert len({round(p, 4) for p in peaks}) == 5


def _log_mel_stats(waves: torch.Tensor) -> torch.Tensor:
    mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=1024, hop_length=512, n_mels=64)
    logmel = torch.log(mel(waves) + 1e-6)
    return torch.cat([logmel.mean(-1), logmel.std(-1)], dim=1)


def test_classes_are_learnable_by_a_simple_probe(cache_dir: Path) -> None:
    """Nearest class centroid on log-mel statistics, trained on folds 1-4, tested on fold 5."""
    dataset = load_esc50(synthetic.ensure_dataset(cache_dir, SyntheticConfig()))
    waves = torch.stack([load_waveform(dataset.path(c), 16000) for c in dataset.clips])
    features = _log_mel_stats(waves)
    labels = torch.from_numpy(dataset.labels)
    test = torch.from_numpy(dataset.folds == 5)
    mean, std = features[~test].mean(0), features[~test].std(0) + 1e-6
    z = (features - mean) / std
    centroids = torch.stack([z[~test & (labels == k)].mean(0) for k in range(10)])
    predicted = torch.cdist(z[test], centroids).argmin(1)
    accuracy = (predicted == labels[test]).float().mean().item()
    assert accuracy >= 0.7, accuracy  # measured 0.80; chance is 0.10
