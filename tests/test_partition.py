"""Node partitions: class assignment, disjoint clip splits, Dirichlet termination, bad input."""

from pathlib import Path

import numpy as np
import pytest

from flcore.config import (
    DatasetConfig,
    FederationConfig,
    NodeConfig,
    PartitionConfig,
    PartitionKind,
    SplitKind,
)
from flcore.data.esc50 import AudioDataset, Clip
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
