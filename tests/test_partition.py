"""Node partitions: class assignment, disjoint clip splits that keep recordings whole,
Dirichlet termination, warnings and bad input."""

import logging
from pathlib import Path

import numpy as np
import pytest

from conftest import write_esc50
from flcore.config import (
    DatasetConfig,
    FederationConfig,
    NodeConfig,
    PartitionConfig,
    PartitionKind,
    SplitKind,
    SyntheticConfig,
)
from flcore.data import synthetic
from flcore.data.esc50 import AudioDataset, Clip, load_esc50
from flcore.data.partition import build_partition, split_clips
from flcore.errors import ConfigError, DataError

NAMES = ["dog", "rooster", "rain", "sea_waves", "siren", "engine"]


def fake_dataset(clips_per_class: int = 40, names: list[str] = NAMES) -> AudioDataset:
    """Metadata only: partitions never read audio."""
    clips = [Clip(f"{k}-{i}.wav", i % 5 + 1, k, name)
             for k, name in enumerate(names) for i in range(clips_per_class)]
    return AudioDataset(root=Path("/nowhere"), clips=clips, class_names=list(names))


def federation(kind: PartitionKind = PartitionKind.classes_per_node, **kwargs) -> FederationConfig:
    return FederationConfig(partition=PartitionConfig(kind=kind, **kwargs))


def all_indices(partition, split: str) -> np.ndarray:
    return np.concatenate([getattr(n, split) for n in partition.nodes])


def assert_disjoint_and_complete(partition, dataset: AudioDataset, config: DatasetConfig) -> None:
    codes = split_clips(dataset, config, seed=0)
    for code, split in enumerate(("train", "val", "test")):
        idx = all_indices(partition, split)
        assert len(idx) == len(set(idx.tolist())), f"{split} clips dealt twice"
        held = {dataset.class_names.index(c) for n in partition.nodes for c in n.classes}
        expected = np.flatnonzero((codes == code) & np.isin(dataset.labels, list(held)))
        assert sorted(idx.tolist()) == expected.tolist()


def test_classes_per_node_deals_disjoint_classes() -> None:
    dataset, config = fake_dataset(), DatasetConfig()
    partition = build_partition(dataset, config, federation(num_nodes=3, classes_per_node=2), 0)
    assert [len(n.classes) for n in partition.nodes] == [2, 2, 2]
    assert sorted(c for n in partition.nodes for c in n.classes) == sorted(NAMES)
    for node in partition.nodes:
        assert node.counts() == {"train": 48, "val": 16, "test": 16}
        assert set(dataset.labels[node.train]) == {NAMES.index(c) for c in node.classes}
    assert_disjoint_and_complete(partition, dataset, config)


def test_more_nodes_than_classes_share_clips_disjointly() -> None:
    dataset, config = fake_dataset(), DatasetConfig()
    partition = build_partition(dataset, config, federation(num_nodes=6, classes_per_node=2), 0)
    assert all(node.counts()["train"] == 24 for node in partition.nodes)
    assert_disjoint_and_complete(partition, dataset, config)


def test_explicit_nodes_split_a_shared_class() -> None:
    dataset, config = fake_dataset(), DatasetConfig()
    nodes = [NodeConfig(["dog", "rain"]), NodeConfig(["dog"]), NodeConfig(["dog", "siren"])]
    partition = build_partition(dataset, config, FederationConfig(nodes=nodes), 0)
    assert [n.classes for n in partition.nodes] == [["dog", "rain"], ["dog"], ["dog", "siren"]]
    dog_train = [int((dataset.labels[n.train] == 0).sum()) for n in partition.nodes]
    assert dog_train == [8, 8, 8]
    assert_disjoint_and_complete(partition, dataset, config)


def test_iid_gives_every_node_every_class() -> None:
    dataset, config = fake_dataset(), DatasetConfig()
    partition = build_partition(dataset, config, federation(PartitionKind.iid, num_nodes=4), 0)
    assert all(n.classes == NAMES for n in partition.nodes)
    counts = [n.counts()["train"] for n in partition.nodes]
    assert sum(counts) == 144 and max(counts) - min(counts) <= len(NAMES)
    assert_disjoint_and_complete(partition, dataset, config)


def test_dirichlet_skews_labels_and_respects_min_samples() -> None:
    dataset, config = fake_dataset(), DatasetConfig()
    fed = federation(PartitionKind.dirichlet, num_nodes=4, alpha=0.1, min_samples_per_node=10)
    partition = build_partition(dataset, config, fed, 0)
    assert all(n.counts()["train"] >= 10 for n in partition.nodes)
    assert_disjoint_and_complete(partition, dataset, config)
    histograms = np.array([np.bincount(dataset.labels[n.train], minlength=6)
                           for n in partition.nodes])
    share_of_top_node = (histograms.max(0) / histograms.sum(0)).mean()
    assert share_of_top_node > 0.6, histograms
    again = build_partition(dataset, config, fed, 0)
    assert all((a.train == b.train).all() for a, b in zip(partition.nodes, again.nodes,
                                                          strict=True))


def test_dirichlet_with_1000_nodes_terminates_with_a_clear_error() -> None:
    dataset = fake_dataset(clips_per_class=400, names=[f"class_{i}" for i in range(5)])
    fed = federation(PartitionKind.dirichlet, num_nodes=1000, alpha=0.01, max_retries=20)
    with pytest.raises(DataError, match=r"no Dirichlet draw \(alpha=0.01, 1000 nodes\)"):
        build_partition(dataset, DatasetConfig(), fed, 0)


def test_dirichlet_with_1000_nodes_succeeds_when_data_allows() -> None:
    dataset = fake_dataset(clips_per_class=800, names=[f"class_{i}" for i in range(50)])
    fed = federation(PartitionKind.dirichlet, num_nodes=1000, alpha=10.0)
    partition = build_partition(dataset, DatasetConfig(), fed, 0)
    assert len(partition.nodes) == 1000
    assert min(n.counts()["train"] for n in partition.nodes) >= 1


def test_ratio_split_is_stratified_and_seeded() -> None:
    dataset = fake_dataset(clips_per_class=20)
    config = DatasetConfig(split=SplitKind.ratio, train_ratio=0.6, val_ratio=0.15)
    codes = split_clips(dataset, config, seed=3)
    for k in range(len(NAMES)):
        assert np.bincount(codes[dataset.labels == k], minlength=3).tolist() == [12, 3, 5]
    assert (split_clips(dataset, config, seed=3) == codes).all()
    assert (split_clips(dataset, config, seed=4) != codes).any()


def test_unknown_class_suggests_close_matches() -> None:
    nodes = [NodeConfig(["dgo"])]
    with pytest.raises(ConfigError, match=r"federation.nodes\[0\].classes: unknown class 'dgo' "
                                          r"\(did you mean dog\?\)"):
        build_partition(fake_dataset(), DatasetConfig(), FederationConfig(nodes=nodes), 0)


def test_node_without_clips_after_split_is_an_error() -> None:
    dataset = fake_dataset(clips_per_class=5)
    nodes = [NodeConfig(["dog"]), NodeConfig(["dog"]), NodeConfig(["dog"]), NodeConfig(["dog"])]
    with pytest.raises(DataError, match=r"node \d \(classes: dog\) has 0 train clips after"):
        build_partition(dataset, DatasetConfig(), FederationConfig(nodes=nodes), 0)


def test_folds_not_in_the_data_are_named() -> None:
    config = DatasetConfig(test_folds=[6])
    with pytest.raises(ConfigError, match=r"dataset.test_folds=\[6\]: fold\(s\) \[6\] not in"):
        build_partition(fake_dataset(), config, federation(), 0)


def test_too_many_classes_per_node() -> None:
    with pytest.raises(ConfigError, match="classes_per_node=7: the dataset has only 6 classes"):
        build_partition(fake_dataset(), DatasetConfig(), federation(classes_per_node=7), 0)


def test_table_and_stats() -> None:
    partition = build_partition(fake_dataset(), DatasetConfig(), federation(num_nodes=3), 0)
    table = partition.table().splitlines()
    assert table[0].split() == ["node", "classes", "train", "val", "test"]
    assert len(table) == 5 and table[-1].split()[-3:] == ["144", "48", "48"]
    stats = partition.stats()
    assert stats["num_nodes"] == 3 and stats["num_classes"] == 6 and stats["train_clips"] == 144


RATIO = DatasetConfig(split=SplitKind.ratio, train_ratio=0.6, val_ratio=0.2)


def recordings_folder(root: Path) -> Path:
    """Three classes x 15 recordings of 1 to 4 clips each (36 clips a class), ESC-50 named."""
    rows = [(f"{r % 5 + 1}-{target}{r:03d}-{take}-{target}.wav", r % 5 + 1, target, name)
            for target, name in enumerate(["dog", "rain", "siren"])
            for r in range(15) for take in "ABCD"[: r % 4 + 1]]
    return write_esc50(root, rows, rate=8000, seconds=0.1)


def splits_per_recording(dataset: AudioDataset, codes: np.ndarray) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for clip, code in zip(dataset.clips, codes.tolist(), strict=True):
        found.setdefault(clip.src_file, set()).add(code)
    return found


def clip_level_split(labels: np.ndarray, seed: int) -> np.ndarray:
    """The former ``split=ratio``: each class's clips shuffled and cut 60/20/20, clip by clip."""
    rng, codes = np.random.default_rng(seed), np.empty(len(labels), dtype=np.int64)
    for target in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == target))
        codes[idx] = np.repeat([0, 1, 2], np.diff(np.round(np.array([0, 0.6, 0.8, 1.0])
                                                           * len(idx)).astype(int)))
    return codes


def test_ratio_split_keeps_every_recording_in_one_split(tmp_path: Path) -> None:
    dataset = load_esc50(recordings_folder(tmp_path / "esc"))
    assert len(dataset.clips) == 108 and len({c.src_file for c in dataset.clips}) == 45
    old = splits_per_recording(dataset, clip_level_split(dataset.labels, 0))
    assert sum(len(s) > 1 for s in old.values()) == 27  # of 33 multi-clip recordings
    for seed in range(5):
        codes = split_clips(dataset, RATIO, seed)
        assert all(len(s) == 1 for s in splits_per_recording(dataset, codes).values())
        for target in range(3):  # 36 clips: shares 21.6 / 7.2 / 7.2, the nearest whole counts
            assert np.bincount(codes[dataset.labels == target]).tolist() == [22, 7, 7]
    codes = split_clips(dataset, RATIO, 3)
    assert (split_clips(dataset, RATIO, 3) == codes).all()
    assert (split_clips(dataset, RATIO, 4) != codes).any()


def test_ratio_partition_lists_files_and_shares_no_recording(tmp_path: Path) -> None:
    dataset = load_esc50(recordings_folder(tmp_path / "esc"))
    partition = build_partition(dataset, RATIO, federation(PartitionKind.iid, num_nodes=2), 0)
    assert partition.stats()["shared_recordings"] == 0
    files = partition.files()
    assert [f["node"] for f in files] == [0, 1]
    for node, listed in zip(partition.nodes, files, strict=True):
        for split in ("train", "val", "test"):
            assert listed[split] == [dataset.clips[i].filename for i in getattr(node, split)]
    sides = [{name.split("-")[1] for f in files for name in f[s]} for s in ("train", "val", "test")]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert sorted(n for f in files for s in ("train", "val", "test") for n in f[s]) == sorted(
        c.filename for c in dataset.clips)


def test_folds_that_break_recordings_are_counted_and_warned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [(f"{r + 1}-{target}{r:03d}-A-{target}.wav", r + 1, target, name)
            for target, name in enumerate(["dog", "rain"]) for r in range(5)]
    rows += [("5-0000-B-0.wav", 5, 0, "dog"), ("4-1001-B-1.wav", 4, 1, "rain"),
             ("5-1001-C-1.wav", 5, 1, "rain")]  # 0000 in train and test; 1001 in all three
    dataset = load_esc50(write_esc50(tmp_path / "esc", rows, rate=8000, seconds=0.1))
    with caplog.at_level(logging.WARNING):
        partition = build_partition(dataset, DatasetConfig(), federation(num_nodes=1,
                                                                         classes_per_node=2), 0)
    assert partition.stats()["shared_recordings"] == 2
    assert "2 source recording(s) (src_file)" in caplog.text


def test_a_mixed_recording_goes_with_its_majority_class() -> None:
    """Recording M (two 'a' clips, one 'b' clip) is dealt among class a's recordings."""
    clips = [Clip(f"a{i}.wav", 1, 0, "a") for i in range(4)]
    clips += [Clip("m1.wav", 1, 0, "a", "M"), Clip("m2.wav", 1, 0, "a", "M"),
              Clip("m3.wav", 1, 1, "b", "M")]
    dataset = AudioDataset(root=Path("/nowhere"), clips=clips, class_names=["a", "b"])
    config = DatasetConfig(split=SplitKind.ratio, train_ratio=0.3, val_ratio=0.3)
    # Class a: 7 clips, shares 2.1 / 2.1 / 2.8: M (3 clips, dealt first) goes to test. As class
    # b's only recording it would have been kept in train.
    for seed in range(3):
        assert split_clips(dataset, config, seed).tolist()[4:] == [2, 2, 2]
    partition = build_partition(dataset, config, FederationConfig(nodes=[NodeConfig(["a", "b"])]),
                                0)
    assert partition.warnings() == ["node 0: class 'b' has no train clips (the node "
                                    "never trains on it)"]


def test_bundled_synthetic_data_has_one_recording_per_clip(
        cache_dir: Path, small_synthetic: SyntheticConfig) -> None:
    dataset = load_esc50(synthetic.ensure_dataset(cache_dir, small_synthetic))
    assert [c.src_file for c in dataset.clips] == [c.filename.split("-")[1]
                                                   for c in dataset.clips]
    assert len({c.src_file for c in dataset.clips}) == len(dataset.clips) == 400
    config = DatasetConfig(split=SplitKind.ratio)
    partition = build_partition(dataset, config, federation(num_nodes=5), 0)
    assert partition.stats()["shared_recordings"] == 0
    codes = split_clips(dataset, config, 0)
    for target in range(10):
        assert np.bincount(codes[dataset.labels == target]).tolist() == [28, 4, 8]


def test_warnings_name_nodes_without_train_clips_of_a_class_or_without_test_clips() -> None:
    dataset = fake_dataset(clips_per_class=5)  # dog: 3 train, 1 val, 1 test clip
    nodes = [NodeConfig([other, "dog"]) for other in ["rain", "siren", "engine", "sea_waves"]]
    partition = build_partition(dataset, DatasetConfig(), FederationConfig(nodes=nodes), 0)
    dog_train = [int((dataset.labels[n.train] == 0).sum()) for n in partition.nodes]
    assert dog_train == [1, 1, 1, 0]
    assert partition.warnings() == ["node 3: class 'dog' has no train clips (the node "
                                    "never trains on it)"]
    nodes = [NodeConfig(["dog"]), NodeConfig(["dog"])]
    partition = build_partition(dataset, DatasetConfig(), FederationConfig(nodes=nodes), 0)
    assert [len(n.test) for n in partition.nodes] == [1, 0]
    assert partition.warnings() == ["node 1 has no test clips (its local accuracy is not "
                                    "measured)"]


def test_more_nodes_than_clips_of_a_class_still_share_each_split_evenly() -> None:
    """1000 nodes, 6 classes of 300 train clips: rounding each class's shares alone would give
    the same 700 nodes no train clip of any class."""
    dataset = fake_dataset(clips_per_class=500)
    config = FederationConfig(partition=PartitionConfig(kind=PartitionKind.iid, num_nodes=1000))
    partition = build_partition(dataset, DatasetConfig(), config, 0)
    train = np.array([len(n.train) for n in partition.nodes])
    expected = partition.stats()["train_clips"] / 1000
    assert train.min() >= np.floor(expected) and train.max() <= np.ceil(expected)


def test_unscored_names_node_classes_without_clips_in_the_scoring_split() -> None:
    """Folds 1-3 train, 4 val, 5 test: 'rain' has one clip in fold 1, 'siren' clips in folds 1
    and 5. One node: it has val clips, so val scores it and both lack val clips. Two nodes, one
    per class: neither has val clips, so test scores them and only rain lacks one."""
    clips = [Clip(f"dog-{i}.wav", i % 5 + 1, 0, "dog") for i in range(5)]
    clips += [Clip("rain-0.wav", 1, 1, "rain"), Clip("siren-0.wav", 1, 2, "siren"),
              Clip("siren-1.wav", 5, 2, "siren")]
    dataset = AudioDataset(root=Path("/nowhere"), clips=clips, class_names=["dog", "rain", "siren"])
    one = build_partition(dataset, DatasetConfig(),
                          FederationConfig(nodes=[NodeConfig(["dog", "rain", "siren"])]), 0)
    assert one.unscored() == [
        f"node 0: class '{c}' has no val clips to score its generators on (its per-class gen/* "
        "metrics are undefined)" for c in ("rain", "siren")]
    two = build_partition(dataset, DatasetConfig(),
                          FederationConfig(nodes=[NodeConfig(["rain"]), NodeConfig(["siren"])]), 0)
    assert two.unscored() == ["node 0: class 'rain' has no test clips to score its generators "
                              "on (its per-class gen/* metrics are undefined)"]
