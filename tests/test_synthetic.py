"""The bundled synthetic dataset: layout, determinism, caching, learnability, and the default
benchmark's shape (400 test clips, recordings kept within one fold)."""

import csv
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from conftest import CONFIGS
from flcore.config import SyntheticConfig, validate
from flcore.data import synthetic
from flcore.data.esc50 import load_esc50, load_waveform
from flcore.errors import ConfigError

# The small set's kind of clip (no recordings, room or background), 5 per class of 1 s.
SMALL = SyntheticConfig(clips_per_class=5, clips_per_source=1, fold_weights=[1, 1, 1, 1, 1],
                        duration_s=1.0, snr_db=[8.0, 30.0], background_db=[], room=False)
# The default's kind of clip (recordings of 2 takes in a room, a background), 10 per class of 1 s.
HARD = replace(SyntheticConfig(), clips_per_class=10, clips_per_source=2,
               fold_weights=[1, 1, 1, 1, 1], duration_s=1.0)


def test_layout_matches_esc50(cache_dir: Path, small_synthetic: SyntheticConfig) -> None:
    root = synthetic.ensure_dataset(cache_dir, small_synthetic)
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
    c = synthetic.write_dataset(tmp_path / "c", replace(SMALL, seed=1), progress=False)
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


def test_classes_are_learnable_by_a_simple_probe(cache_dir: Path,
                                                small_synthetic: SyntheticConfig) -> None:
    """Nearest class centroid on log-mel statistics, trained on folds 1-4, tested on fold 5."""
    dataset = load_esc50(synthetic.ensure_dataset(cache_dir, small_synthetic))
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


def test_small_set_deals_one_clip_per_recording_to_folds_in_turn() -> None:
    assert [synthetic.source_of(c, SMALL) for c in range(3)] == [(0, "A"), (1, "A"), (2, "A")]
    assert [synthetic.fold_of(s, SMALL) for s in range(6)] == [1, 2, 3, 4, 5, 1]
    assert [synthetic.source_of(c, HARD) for c in range(3)] == [(0, "A"), (0, "B"), (1, "A")]


def test_hard_clips_are_deterministic_and_differ_from_dry_ones(tmp_path: Path) -> None:
    a = synthetic.write_dataset(tmp_path / "a", HARD, progress=False)
    b = synthetic.write_dataset(tmp_path / "b", HARD, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 101
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    dry = synthetic.synthesize_clip(0, 0, replace(HARD, background_db=[], room=False))
    assert not np.array_equal(synthetic.synthesize_clip(0, 0, HARD), dry)


def test_a_recordings_takes_share_its_room_and_background() -> None:
    """Takes of one recording get the same room; another recording gets another one."""
    n = 2 * round(HARD.duration_s * HARD.sample_rate)
    rooms = [synthetic._room_filter(synthetic._source_rng(0, s, HARD), n // 2, HARD.sample_rate)
             for s in (0, 0, 1)]
    assert np.array_equal(rooms[0], rooms[1]) and not np.allclose(rooms[0], rooms[2])


def _compose_default(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_config_is_the_benchmark() -> None:
    config = validate(_compose_default())
    assert config.dataset.synthetic == SyntheticConfig()
    assert (config.dataset.train_folds, config.dataset.val_folds,
            config.dataset.test_folds) == ([1, 2, 3], [4], [5])


def test_default_benchmark_has_400_test_clips_and_whole_recordings_per_fold() -> None:
    rows = synthetic.clip_rows(SyntheticConfig())
    assert len(rows) == 10 * 72 and len({r.filename for r in rows}) == len(rows)
    folds = np.bincount([r.fold for r in rows], minlength=6)[1:]
    assert folds.tolist() == [80, 80, 80, 80, 400]
    by_recording = defaultdict(set)
    for r in rows:
        by_recording[r.src_file].add((r.fold, r.target))
    assert len(by_recording) == 180 and all(len(v) == 1 for v in by_recording.values())
    assert {r.take for r in rows} == {"A", "B", "C", "D"}


def test_small_config_composes_to_format_1s_shape(small_synthetic: SyntheticConfig) -> None:
    assert replace(small_synthetic, clips_per_class=5, duration_s=1.0) == SMALL
    assert small_synthetic.clips_per_class == 40 and small_synthetic.duration_s == 5.0


@pytest.mark.parametrize(("override", "message"), [
    ("dataset.synthetic.clips_per_class=35",
     "dataset.synthetic.clips_per_class=35: must be >= 36 (clips_per_source x the sum of "
     "fold_weights"),
    ("dataset.synthetic.clips_per_source=0", "dataset.synthetic.clips_per_source=0: must be in "
                                             "[1, 26]"),
    ("dataset.synthetic.fold_weights=[1,1,1,1]", "dataset.synthetic.fold_weights=[1,1,1,1]: "
                                                 "must be 5 integers >= 1"),
    ("dataset.synthetic.fold_weights=[1,1,0,1,1]", "must be 5 integers >= 1"),
    ("dataset.synthetic.snr_db=[20,10]", "dataset.synthetic.snr_db=[20.0,10.0]: must be [low, "
                                         "high] with -20 <= low <= high <= 60"),
    ("dataset.synthetic.background_db=[-6]", "dataset.synthetic.background_db=[-6.0]: must be "
                                             "[] (no background) or [low, high]"),
    ("dataset.synthetic.background_db=[-6,3]", "with -60 <= low <= high <= 0"),
])
def test_synthetic_keys_are_range_checked(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(_compose_default(override))
    assert message in str(err.value)


def test_every_parameter_names_the_cache_folder() -> None:
    base = SyntheticConfig()
    changed = [replace(base, **{k: v}) for k, v in (
        ("clips_per_class", 80), ("clips_per_source", 2), ("fold_weights", [1, 1, 1, 1, 1]),
        ("duration_s", 3.0), ("sample_rate", 22050), ("snr_db", [5.0, 26.0]),
        ("background_db", []), ("room", False), ("seed", 1))]
    names = {synthetic.dataset_dirname(c) for c in [base, *changed]}
    assert len(names) == len(changed) + 1


def test_tests_run_on_the_small_set_unless_they_pick_a_dataset(
        make_config: Callable[..., DictConfig], small_synthetic: SyntheticConfig) -> None:
    assert OmegaConf.to_object(make_config().dataset.synthetic) == small_synthetic
    assert make_config("+experiment=esc50_perclass").dataset.name == "esc50"
    assert make_config("dataset=folder").dataset.name == "folder"
