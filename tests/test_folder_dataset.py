"""Folder datasets (class folders, or a filename,label[,split][,group] CSV) and the sharded,
resumable, parallel embedding pass."""

import csv
import logging
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from flcore.config import (
    AudioEncoderConfig,
    AudioEncoderName,
    DatasetConfig,
    DatasetName,
    FederationConfig,
    OnBadFile,
    PartitionConfig,
    PartitionKind,
    SplitKind,
    SyntheticConfig,
    validate,
)
from flcore.data import load_dataset
from flcore.data.embeddings import EmbeddingCache, dataset_fingerprint, embed_audio
from flcore.data.folder import FolderDataset, load_folder
from flcore.data.partition import SPLITS, build_partition, split_clips
from flcore.data.synthetic import CLASSES, synthesize_clip
from flcore.encoders.audio import MfccEncoder, YamnetEncoder
from flcore.errors import ConfigError, DataError

CLIP = SyntheticConfig(duration_s=1.0, sample_rate=16000)
NAMES = list(CLASSES)[:4]
SPLIT_OF_GROUP = ("train", "train", "train", "val", "test", "test")


def write_clip(path: Path, target: int, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, synthesize_clip(target, index, CLIP), CLIP.sample_rate, subtype="PCM_16")


def write_collection(root: Path, groups: int = 6, per_group: int = 3) -> list[dict[str, str]]:
    """``root/audio/<class>/g<group>/<clip>.wav`` for the first four synthetic classes; the
    rows of its CSV (filename relative to ``root``, label, split by group, group)."""
    rows = []
    for target, name in enumerate(NAMES):
        for group in range(groups):
            for take in range(per_group):
                filename = f"audio/{name}/g{group}/{take}.wav"
                write_clip(root / filename, target, group * per_group + take)
                rows.append({"filename": filename, "label": name,
                             "split": SPLIT_OF_GROUP[group % len(SPLIT_OF_GROUP)],
                             "group": f"{name}-g{group}"})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = (
        "filename", "label", "split", "group")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """A read-only collection of 4 classes x 6 recordings x 3 clips (1 s, 16 kHz)."""
    root = tmp_path_factory.mktemp("collection")
    rows = write_collection(root)
    write_csv(root / "meta.csv", rows)
    return root, rows


def mfcc() -> MfccEncoder:
    return MfccEncoder(AudioEncoderConfig(name=AudioEncoderName.mfcc))


# --- the reader -------------------------------------------------------------------------------

def test_class_folders_give_sorted_classes_labels_and_relative_names(tmp_path: Path) -> None:
    for target, name in [(1, "rain"), (0, "dog")]:
        for i in range(3):
            write_clip(tmp_path / name / ("deep/er" if i == 2 else "") / f"{i}.wav", target, i)
    (tmp_path / "dog" / "notes.txt").write_text("not audio")
    write_clip(tmp_path / "dog" / ".hidden.wav", 0, 9)
    write_clip(tmp_path / ".trash" / "x.wav", 0, 9)
    dataset = load_folder(tmp_path)
    assert isinstance(dataset, FolderDataset) and dataset.metadata is None
    assert dataset.class_names == ["dog", "rain"]
    assert [c.filename for c in dataset.clips] == [
        "dog/0.wav", "dog/1.wav", "dog/deep/er/2.wav", "rain/0.wav", "rain/1.wav",
        "rain/deep/er/2.wav"]
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert all(c.src_file == c.filename and c.fold == 0 for c in dataset.clips)
    assert dataset.path(dataset.clips[2]) == tmp_path / "dog" / "deep" / "er" / "2.wav"


def test_csv_gives_labels_splits_and_groups(collection) -> None:
    root, rows = collection
    dataset = load_folder(None, root / "meta.csv")  # names relative to the CSV's folder
    assert dataset.root == root and dataset.has_splits
    assert dataset.class_names == sorted(NAMES)
    by_name = {c.filename: c for c in dataset.clips}
    for row in rows:
        clip = by_name[row["filename"]]
        assert dataset.class_names[clip.target] == row["label"] == clip.category
        assert clip.fold == {"train": 1, "val": 2, "test": 3}[row["split"]]
        assert clip.src_file == row["group"]
        assert dataset.path(clip).is_file()


def test_csv_names_relative_to_dataset_root(collection, tmp_path: Path) -> None:
    root, rows = collection
    meta = write_csv(tmp_path / "elsewhere" / "labels.csv", rows[:6], ("filename", "label"))
    dataset = load_folder(root, meta)
    assert dataset.root == root and not dataset.has_splits
    assert [c.src_file for c in dataset.clips] == [c.filename for c in dataset.clips]
    assert len(dataset.clips) == 6


def shared_groups(dataset: FolderDataset, split: np.ndarray, groups: dict[str, str]) -> int:
    """Recordings (``groups``: file -> group) with clips in more than one split."""
    seen: dict[str, set[int]] = {}
    for clip, code in zip(dataset.clips, split, strict=True):
        seen.setdefault(groups[clip.filename], set()).add(int(code))
    return sum(len(codes) > 1 for codes in seen.values())


def test_groups_keep_recordings_on_one_side_of_a_ratio_split(collection, tmp_path: Path) -> None:
    root, rows = collection
    groups = {r["filename"]: r["group"] for r in rows}
    config = DatasetConfig(name=DatasetName.folder, split=SplitKind.ratio, train_ratio=0.5,
                           val_ratio=0.2)
    federation = FederationConfig(partition=PartitionConfig(kind=PartitionKind.iid,
                                                            num_nodes=2))
    dataset = load_folder(None, root / "meta.csv")
    partition = build_partition(dataset, config, federation, seed=0)
    assert partition.stats()["shared_recordings"] == 0
    assert all(partition.stats()[f"{s}_clips"] > 0 for s in SPLITS)
    assert shared_groups(dataset, split_clips(dataset, config, 0), groups) == 0
    # Without the group column every file is its own recording, and recordings do get split.
    ungrouped = load_folder(root, write_csv(tmp_path / "flat.csv", rows, ("filename", "label")))
    assert shared_groups(ungrouped, split_clips(ungrouped, config, 0), groups) > 0


def test_split_folds_follows_the_split_column(collection) -> None:
    root, rows = collection
    config = DatasetConfig(name=DatasetName.folder, csv=str(root / "meta.csv"),
                           split=SplitKind.folds, train_folds=[1], val_folds=[2], test_folds=[3])
    dataset = load_dataset(config, root)
    split = split_clips(dataset, config, seed=0)
    wanted = {r["filename"]: SPLITS.index(r["split"]) for r in rows}
    assert split.tolist() == [wanted[c.filename] for c in dataset.clips]


def test_folder_config_validates(make_config: Callable[..., Any], tmp_path: Path) -> None:
    config = validate(make_config("dataset=folder", f"dataset.root={tmp_path}"))
    assert config.dataset.name is DatasetName.folder and config.dataset.csv is None
    assert config.dataset.split is SplitKind.ratio
    assert (config.embeddings.workers, config.embeddings.shard_size) == (0, 256)


@pytest.mark.parametrize(("overrides", "message"), [
    (["dataset=folder"], "dataset.root=None: dataset.name=folder needs a folder of class "
                         "folders (dataset.root) or a filename,label[,split][,group] CSV"),
    (["dataset=esc50", "dataset.root=/x", "dataset.csv=/x/a.csv"],
     "dataset.csv=/x/a.csv: applies to dataset.name=folder only"),
    (["embeddings.workers=-1"], "embeddings.workers=-1: must be >= 0"),
    (["embeddings.shard_size=0"], "embeddings.shard_size=0: must be >= 1"),
])
def test_bad_config_is_one_line(make_config: Callable[..., Any], overrides: list[str],
                                message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_config(*overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def bad_input(tmp_path: Path, case: str) -> tuple[DatasetConfig, str]:
    """A dataset config with one problem, and the words its error must hold."""
    write_clip(tmp_path / "data" / "dog" / "a.wav", 0, 0)
    write_clip(tmp_path / "data" / "rain" / "b.wav", 1, 0)
    meta = tmp_path / "data" / "meta.csv"
    config = DatasetConfig(name=DatasetName.folder, root=str(tmp_path / "data"))
    if case == "missing root":
        config.root = str(tmp_path / "nowhere")
        return config, f"dataset.root={tmp_path / 'nowhere'}: folder not found; point dataset.root"
    if case == "missing csv":
        config.csv = str(tmp_path / "no.csv")
        return config, "dataset.csv=" + str(tmp_path / "no.csv") + ": file not found"
    config.csv = str(meta)
    if case == "csv without label column":
        meta.write_text("filename,class\ndog/a.wav,dog\n")
        return config, "no column(s) label (header: filename,class); its first line must be a " \
                       "header filename,label[,split][,group]"
    if case == "unknown split":
        meta.write_text("filename,label,split\ndog/a.wav,dog,train\nrain/b.wav,rain,dev\n")
        return config, "meta.csv:3: split 'dev' is not one of train, val, test"
    if case == "empty label":
        meta.write_text("filename,label\ndog/a.wav,\n")
        return config, "meta.csv:2: empty label"
    if case == "file listed twice":
        meta.write_text("filename,label\ndog/a.wav,dog\ndog/a.wav,rain\n")
        return config, "meta.csv:3: dog/a.wav is listed twice (also on line 2)"
    if case == "missing file":
        meta.write_text("filename,label\ndog/a.wav,dog\nrain/gone.wav,rain\n")
        return config, "rain/gone.wav: file not found; fix or remove it, or set " \
                       "dataset.on_bad_file=skip"
    if case == "label with no usable files":
        meta.write_text("filename,label\ndog/a.wav,dog\nrain/gone.wav,rain\n")
        config.on_bad_file = OnBadFile.skip
        return config, "class 'rain' has no usable files (all were skipped)"
    if case == "folds without a split column":
        meta.write_text("filename,label\ndog/a.wav,dog\nrain/b.wav,rain\n")
        config.split = SplitKind.folds
        return config, "dataset.split=folds: " + str(meta) + " has no split column, so no " \
                       "folds; set dataset.split=ratio"
    if case == "val fold absent":
        meta.write_text("filename,label,split\ndog/a.wav,dog,train\nrain/b.wav,rain,test\n")
        config.split, config.train_folds, config.val_folds, config.test_folds = (
            SplitKind.folds, [1], [2], [3])
        return config, "dataset.val_folds=[2]: " + str(meta) + " has no rows of fold(s) [2] " \
                       "(its split column holds: train, test"
    config.csv = None
    if case == "empty class folder":
        (tmp_path / "data" / "cat").mkdir()
        (tmp_path / "data" / "cat" / "readme.txt").write_text("")
        return config, "class folder 'cat' holds no audio files"
    assert case == "no class folders"
    config.root = str(tmp_path / "data" / "dog")
    return config, "no class folders in it"


@pytest.mark.parametrize("case", [
    "missing root", "missing csv", "csv without label column", "unknown split", "empty label",
    "file listed twice", "missing file", "label with no usable files",
    "folds without a split column", "val fold absent", "empty class folder", "no class folders"])
def test_bad_input_is_one_clear_line(tmp_path: Path, case: str) -> None:
    config, words = bad_input(tmp_path, case)
    with pytest.raises(DataError) as err:
        load_dataset(config, tmp_path)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_too_short_file_is_a_bad_file_or_skipped(tmp_path: Path) -> None:
    for i in range(2):
        write_clip(tmp_path / "dog" / f"{i}.wav", 0, i)
    sf.write(tmp_path / "dog" / "short.wav", np.zeros(16, np.float32), 16000)
    with pytest.raises(DataError, match=r"short\.wav: too short .* dataset.on_bad_file=skip"):
        load_folder(tmp_path, min_seconds=0.025)
    dataset = load_folder(tmp_path, on_bad_file=OnBadFile.skip, min_seconds=0.025)
    assert len(dataset.clips) == 2 and list(dataset.skipped) == ["dog/short.wav"]


def test_a_clip_under_the_stated_length_is_kept_and_listed_or_refused_when_strict(
        tmp_path: Path) -> None:
    """1 s clips at 16 kHz; one written with 12000 samples is 0.75 s."""
    for i in range(2):
        write_clip(tmp_path / "dog" / f"{i}.wav", 0, i)
    sf.write(tmp_path / "dog" / "cut.wav", np.zeros(12000, np.float32), 16000)
    config = DatasetConfig(name=DatasetName.folder, root=str(tmp_path), split=SplitKind.ratio,
                           clip_seconds=1.0)
    dataset = load_dataset(config, tmp_path)
    assert len(dataset.clips) == 3 and dataset.short == {"dog/cut.wav": 0.75}
    config.strict = True
    with pytest.raises(DataError, match=r"dog/cut\.wav: 0\.750 s, shorter than "
                                         r"dataset\.clip_seconds=1 \(truncated\?\)"):
        load_dataset(config, tmp_path)


def test_fingerprint_follows_the_csv_and_the_files(tmp_path: Path) -> None:
    rows = write_collection(tmp_path, groups=1, per_group=2)
    meta = write_csv(tmp_path / "meta.csv", rows)
    first = dataset_fingerprint(load_folder(None, meta))
    assert dataset_fingerprint(load_folder(None, meta)) == first
    rows[0]["split"] = "test"
    write_csv(meta, rows)
    relabelled = dataset_fingerprint(load_folder(None, meta))
    assert relabelled != first
    folders = load_folder(tmp_path / "audio")
    before = dataset_fingerprint(folders)
    victim = folders.path(folders.clips[0])
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    assert dataset_fingerprint(load_folder(tmp_path / "audio")) != before
    assert dataset_fingerprint(load_folder(None, meta)) != relabelled


# --- the sharded, resumable, parallel embedding pass ------------------------------------------

class CountingMfcc(MfccEncoder):
    """MFCC that counts its batches and can fail after ``fail_after`` of them (a killed pass)."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__(AudioEncoderConfig(name=AudioEncoderName.mfcc))
        self.calls, self.fail_after = 0, fail_after

    def encode(self, waves):  # type: ignore[override]
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed mid-pass")
        self.calls += 1
        return super().encode(waves)


SHARD = 10  # 72 clips: shards of 10 (the last of 2), one encoder batch per shard


def embed(dataset: FolderDataset, encoder: MfccEncoder, cache: EmbeddingCache,
          **kwargs: Any) -> tuple[torch.Tensor, bool]:
    return embed_audio(dataset, encoder, cache, batch_size=SHARD, progress=False,
                       shard_size=SHARD, **kwargs)


def test_a_killed_pass_resumes_with_only_the_missing_shards(
        collection, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = load_folder(None, collection[0] / "meta.csv")
    reference, _ = embed(dataset, mfcc(), EmbeddingCache(None))
    assert reference.shape == (72, 8, 120)
    cache = EmbeddingCache(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        embed(dataset, CountingMfcc(fail_after=3), cache)
    [entry] = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == [f"shard-{i:05d}.pt" for i in range(3)]

    resumed = CountingMfcc()
    tokens, hit = embed(dataset, resumed, cache)
    assert (resumed.calls, hit) == (5, False)  # shards 3..7 only
    assert torch.equal(tokens, reference)
    assert (entry / "manifest.json").is_file() and len(list(entry.glob("shard-*.pt"))) == 8

    again = CountingMfcc()
    tokens, hit = embed(dataset, again, cache)
    assert (again.calls, hit) == (0, True) and torch.equal(tokens, reference)

    (entry / "manifest.json").unlink()
    (entry / "shard-00004.pt").unlink()
    (entry / "shard-00006.pt").write_bytes(b"truncated")
    repaired = CountingMfcc()
    with caplog.at_level(logging.WARNING):
        tokens, hit = embed(dataset, repaired, cache)
    assert (repaired.calls, hit) == (2, False) and torch.equal(tokens, reference)
    assert "unreadable cache entry" in caplog.text and "shard-00006.pt" in caplog.text
    assert (entry / "manifest.json").is_file()


def test_a_shard_of_other_clips_is_recomputed(collection, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    dataset = load_folder(None, collection[0] / "meta.csv")
    cache = EmbeddingCache(tmp_path)
    reference, _ = embed(dataset, mfcc(), cache)
    [entry] = tmp_path.iterdir()
    shutil.copy(entry / "shard-00001.pt", entry / "shard-00002.pt")
    counting = CountingMfcc()
    with caplog.at_level(logging.WARNING):
        tokens, _ = embed(dataset, counting, cache)
    assert counting.calls == 1 and torch.equal(tokens, reference)
    assert "shard-00002.pt (filenames: not the clips 20..29)" in caplog.text


def recording_mfcc(folder: str) -> MfccEncoder:
    """An MFCC encoder that leaves in ``folder`` its process id, that process's torch threads
    and the onnxruntime threads YAMNet would use there (built once per worker)."""
    yamnet = YamnetEncoder(AudioEncoderConfig(), Path(folder))
    Path(folder, f"{os.getpid()}-{torch.get_num_threads()}-{yamnet.threads}").touch()
    return mfcc()


def test_worker_processes_give_the_in_process_result(collection, tmp_path: Path) -> None:
    dataset = load_folder(None, collection[0] / "meta.csv")
    reference, _ = embed(dataset, mfcc(), EmbeddingCache(tmp_path / "serial"))
    (tmp_path / "pids").mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # the run's threads, which its 2 workers split: 2 each
    try:
        tokens, hit = embed(dataset, mfcc(), EmbeddingCache(tmp_path / "parallel"), workers=2,
                            build_encoder=partial(recording_mfcc, str(tmp_path / "pids")))
    finally:
        torch.set_num_threads(threads)
    assert not hit and torch.allclose(tokens, reference, rtol=0, atol=1e-6)
    workers = [tuple(map(int, p.name.split("-"))) for p in (tmp_path / "pids").iterdir()]
    pids = {pid for pid, _, _ in workers}
    assert len(pids) == 2 and os.getpid() not in pids
    assert [(torch_threads, ort_threads) for _, torch_threads, ort_threads in workers] == [
        (2, 2), (2, 2)]
    [entry] = (tmp_path / "parallel").iterdir()
    assert len(list(entry.glob("shard-*.pt"))) == 8 and (entry / "manifest.json").is_file()


def test_end_to_end_run_on_a_folder_dataset(run_config: Callable[..., dict], collection,
                                            tmp_path: Path) -> None:
    root, _ = collection
    results = run_config(
        "dataset=folder", f"dataset.csv={root / 'meta.csv'}", "audio_encoder=mfcc",
        "federation.rounds=1", "federation.partition.num_nodes=2", "logger=[csv]",
        "adapter.hidden_dim=64", "generator=none", "server.adapter_training=fedavg",
        "embeddings.workers=2", "embeddings.shard_size=20",
        f"embeddings.cache_dir={tmp_path / 'emb'}")
    assert results["status"] == "completed"
    assert results["embeddings"]["audio_shape"] == [72, 8, 120]
    assert results["partition"]["shared_recordings"] == 0
    assert results["partition"]["num_classes"] == 4
    assert len(list((tmp_path / "emb").glob("*/shard-*.pt"))) == 4
    assert "global/acc" in results["final"]
