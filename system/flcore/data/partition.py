"""Which classes each node holds, and each node's disjoint train / val / test clips.

A partition is built in three steps: every clip gets a split (official folds, or a stratified
ratio over whole source recordings, so that no recording has clips on two sides), every class
gets weights over the nodes that hold it (explicit lists, classes per node, IID or Dirichlet),
and the clips of each (class, split) are dealt to those nodes by their weights. A class held by
several nodes therefore has its clips split disjointly among them.
"""

import difflib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from flcore.config import DatasetConfig, FederationConfig, Granularity, PartitionKind, SplitKind
from flcore.data.esc50 import AudioDataset, Clip
from flcore.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def scoring_split(val: np.ndarray, test: np.ndarray) -> str:
    """The split that holds out a node's clips to score its generators: val, else test."""
    return "val" if len(val) else "test"


@dataclass
class NodeSplit:
    """One node: the class names it holds and indices into ``AudioDataset.clips`` per split."""

    node: int
    classes: list[str]
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    granularity: Granularity | None = None

    def counts(self) -> dict[str, int]:
        return {s: len(getattr(self, s)) for s in SPLITS}


@dataclass
class Partition:
    """The federation's nodes over one dataset; ``clips`` is the dataset's clip list, which the
    nodes' indices point into."""

    nodes: list[NodeSplit]
    class_names: list[str]
    clips: list[Clip]

    @property
    def classes(self) -> list[str]:
        """The union of the nodes' classes, in dataset order."""
        held = {c for node in self.nodes for c in node.classes}
        return [c for c in self.class_names if c in held]

    def stats(self) -> dict[str, Any]:
        """Summary figures for results.json and the tracker."""
        train = np.array([len(n.train) for n in self.nodes])
        return {
            "num_nodes": len(self.nodes),
            "num_classes": len(self.classes),
            **{f"{s}_clips": int(sum(len(getattr(n, s)) for n in self.nodes)) for s in SPLITS},
            "train_clips_per_node_min": int(train.min()),
            "train_clips_per_node_max": int(train.max()),
            "classes_per_node_mean": float(np.mean([len(n.classes) for n in self.nodes])),
            "nodes_without_test_clips": sum(len(n.test) == 0 for n in self.nodes),
            "shared_recordings": self.shared_recordings(),
        }

    def shared_recordings(self) -> int:
        """How many source recordings (``src_file``) have clips in more than one of train, val
        and test over the whole federation: each one leaks between the splits."""
        train, val, test = ({self.clips[i].src_file for n in self.nodes for i in getattr(n, s)}
                            for s in SPLITS)
        return len((train & val) | (train & test) | (val & test))

    def files(self) -> list[dict[str, Any]]:
        """Each node's train, val and test file names, for results.json."""
        return [{"node": n.node, **{s: [self.clips[i].filename for i in getattr(n, s)]
                                    for s in SPLITS}} for n in self.nodes]

    def warnings(self) -> list[str]:
        """One line per node class without train clips and per node without test clips."""
        lines = []
        for n in self.nodes:
            trained = {self.class_names[self.clips[i].target] for i in n.train}
            lines += [f"node {n.node}: class '{c}' has no train clips (the node never trains "
                      "on it)" for c in n.classes if c not in trained]
            if len(n.test) == 0:
                lines.append(f"node {n.node} has no test clips (its local accuracy is not "
                             "measured)")
        return lines

    def unscored(self) -> list[str]:
        """One line per node class with train clips but none in the node's scoring split
        (:func:`scoring_split`): its generators have no held-out rows of that class to score."""
        lines = []
        for n in self.nodes:
            split = scoring_split(n.val, n.test)
            held, trained = ({self.class_names[self.clips[i].target] for i in rows}
                             for rows in (getattr(n, split), n.train))
            lines += [f"node {n.node}: class '{c}' has no {split} clips to score its generators "
                      "on (its per-class gen/* metrics are undefined)"
                      for c in n.classes if c in trained and c not in held]
        return lines

    def table(self, width: int = 56) -> str:
        """A plain-text table: node, classes, train/val/test counts."""
        lines = [f"{'node':>4}  {'classes':<{width}} {'train':>6} {'val':>5} {'test':>5}"]
        for n in self.nodes:
            names = ", ".join(n.classes)
            if len(names) > width:
                names = names[: width - 12].rsplit(",", 1)[0] + f", ... (+{len(n.classes)})"
            c = n.counts()
            lines.append(f"{n.node:>4}  {names:<{width}} {c['train']:>6} {c['val']:>5} "
                         f"{c['test']:>5}")
        s = self.stats()
        lines.append(f"{'all':>4}  {str(s['num_classes']) + ' classes':<{width}} "
                     f"{s['train_clips']:>6} {s['val_clips']:>5} {s['test_clips']:>5}")
        return "\n".join(lines)


def split_clips(dataset: AudioDataset, config: DatasetConfig, seed: int) -> np.ndarray:
    """The split of every clip: 0 train, 1 val, 2 test, -1 unused (a fold no split names).

    ``split=ratio`` keeps each source recording's clips in one split (see :func:`_ratio_split`).
    """
    if config.split is SplitKind.folds:
        split = np.full(len(dataset.clips), -1, dtype=np.int64)
        present = sorted(set(dataset.folds.tolist()))
        for code, key in enumerate(("train_folds", "val_folds", "test_folds")):
            folds = getattr(config, key)
            absent = [f for f in folds if f not in present]
            if absent:
                raise ConfigError(f"dataset.{key}={folds}: fold(s) {absent} not in the data "
                                  f"(folds present: {present})")
            split[np.isin(dataset.folds, folds)] = code
        return split
    return _ratio_split(dataset, config, np.random.default_rng([seed, 1]))


def _ratio_split(dataset: AudioDataset, config: DatasetConfig,
                 rng: np.random.Generator) -> np.ndarray:
    """Whole recordings to train / val / test, stratified by each recording's majority class."""
    names, recording = np.unique([c.src_file for c in dataset.clips], return_inverse=True)
    by_class = np.zeros((len(names), len(dataset.class_names)), dtype=np.int64)
    np.add.at(by_class, (recording, dataset.labels), 1)
    sizes, majority = by_class.sum(1), by_class.argmax(1)
    ratios = np.array([config.train_ratio, config.val_ratio,
                       1.0 - config.train_ratio - config.val_ratio])
    split_of = np.empty(len(names), dtype=np.int64)
    for target in range(len(dataset.class_names)):
        members = rng.permutation(np.flatnonzero(majority == target))
        members = members[np.argsort(-sizes[members], kind="stable")]
        split_of[members] = _deal_recordings(sizes[members], ratios)
    return split_of[recording]


def _deal_recordings(sizes: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """Split codes of one class's recordings (largest first): each goes to the split furthest
    below its share of the class's clips; the smallest joins train if train got none."""
    deficit = ratios * sizes.sum()
    codes = np.empty(len(sizes), dtype=np.int64)
    for i, size in enumerate(sizes):
        codes[i] = np.argmax(deficit)
        deficit[codes[i]] -= size
    if len(codes) and not (codes == 0).any():
        codes[-1] = 0
    return codes


def _class_index(name: str, class_names: list[str], key: str) -> int:
    if name in class_names:
        return class_names.index(name)
    close = difflib.get_close_matches(name.replace(" ", "_"), class_names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"available: {', '.join(class_names)}"
    raise ConfigError(f"{key}: unknown class '{name}' ({hint})")


def _explicit_weights(federation: FederationConfig, class_names: list[str]) -> np.ndarray:
    assert federation.nodes is not None
    weights = np.zeros((len(class_names), len(federation.nodes)))
    for n, node in enumerate(federation.nodes):
        for name in node.classes:
            weights[_class_index(name, class_names, f"federation.nodes[{n}].classes"), n] = 1.0
    return weights


def _classes_per_node_weights(num_classes: int, num_nodes: int, per_node: int,
                              rng: np.random.Generator) -> np.ndarray:
    if per_node > num_classes:
        raise ConfigError(f"federation.partition.classes_per_node={per_node}: the dataset has "
                          f"only {num_classes} classes")
    order = rng.permutation(num_classes)
    weights = np.zeros((num_classes, num_nodes))
    for n in range(num_nodes):
        weights[order[(n * per_node + np.arange(per_node)) % num_classes], n] = 1.0
    return weights


def _deal(split: np.ndarray, labels: np.ndarray, weights: np.ndarray,
          rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Deal each (class, split) pool of clips to the nodes in proportion to ``weights``.

    Counts are whole shares plus, for the clips left over, the holders owed the most: the
    largest-remainder method with each node's remainders carried from class to class within a
    split. So with more nodes than clips of a class, every node still gets its share of a split
    over the classes, instead of rounding starving the same nodes class after class.

    Returns, per node, sorted clip indices for train, val and test.
    """
    num_nodes = weights.shape[1]
    owner = np.full(len(labels), -1, dtype=np.int64)
    owed = np.zeros((len(SPLITS), num_nodes))
    for target in range(weights.shape[0]):
        holders = np.flatnonzero(weights[target] > 0)
        if len(holders) == 0:
            continue
        share = weights[target, holders] / weights[target, holders].sum()
        for code in range(len(SPLITS)):
            pool = rng.permutation(np.flatnonzero((labels == target) & (split == code)))
            exact = share * len(pool)
            counts = np.floor(exact).astype(np.int64)
            owed[code, holders] += exact - counts
            extra = holders[np.argsort(-owed[code, holders], kind="stable")[
                : len(pool) - counts.sum()]]
            owed[code, extra] -= 1
            counts[np.searchsorted(holders, extra)] += 1
            owner[pool] = np.repeat(holders, counts)
    dealt = owner >= 0
    key = owner[dealt] * len(SPLITS) + split[dealt]
    order = np.flatnonzero(dealt)[np.argsort(key, kind="stable")]
    groups = np.split(order, np.cumsum(np.bincount(key, minlength=num_nodes * len(SPLITS)))[:-1])
    return [groups[n * len(SPLITS) : (n + 1) * len(SPLITS)] for n in range(num_nodes)]


def _nodes(dealt: list[list[np.ndarray]], weights: np.ndarray, labels: np.ndarray,
           class_names: list[str], from_data: bool) -> list[NodeSplit]:
    nodes = []
    for n, (train, val, test) in enumerate(dealt):
        if from_data:
            held = sorted(set(labels[train].tolist()))
        else:
            held = np.flatnonzero(weights[:, n] > 0).tolist()
        nodes.append(NodeSplit(n, [class_names[t] for t in held], train, val, test))
    return nodes


def _check_nodes(nodes: list[NodeSplit], min_samples: int) -> None:
    for node in nodes:
        if len(node.train) < min_samples:
            raise DataError(
                f"node {node.node} (classes: {', '.join(node.classes) or 'none'}) has "
                f"{len(node.train)} train clips after splitting (needs >= {min_samples}): give "
                "it more classes, share its classes with fewer nodes, or change the split")


def _dirichlet(split: np.ndarray, labels: np.ndarray, num_classes: int,
               federation: FederationConfig, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Label-skew partition (Hsu et al. 2019) redrawn until every node has enough clips."""
    p = federation.partition
    for _ in range(p.max_retries):
        weights = rng.dirichlet(np.full(p.num_nodes, p.alpha), size=num_classes)
        dealt = _deal(split, labels, weights, rng)
        if all(len(train) >= p.min_samples_per_node for train, _, _ in dealt):
            return dealt
    raise DataError(
        f"federation.partition: no Dirichlet draw (alpha={p.alpha:g}, {p.num_nodes} nodes) gave "
        f"every node >= {p.min_samples_per_node} train clips in {p.max_retries} "
        f"tries ({int((split == 0).sum())} train clips in all): raise alpha, lower "
        "num_nodes or min_samples_per_node")


def build_partition(dataset: AudioDataset, dataset_config: DatasetConfig,
                    federation: FederationConfig, seed: int) -> Partition:
    """Assign classes and clips to nodes as the config says; raise on an unusable node."""
    split = split_clips(dataset, dataset_config, seed)
    labels = dataset.labels
    num_classes = len(dataset.class_names)
    rng = np.random.default_rng([seed, 2])
    p = federation.partition
    if federation.nodes is not None:
        weights = _explicit_weights(federation, dataset.class_names)
        nodes = _nodes(_deal(split, labels, weights, rng), weights, labels,
                       dataset.class_names, from_data=False)
        for node, spec in zip(nodes, federation.nodes, strict=True):
            node.granularity = spec.granularity
        _check_nodes(nodes, 1)
    elif p.kind is PartitionKind.dirichlet:
        dealt = _dirichlet(split, labels, num_classes, federation, rng)
        nodes = _nodes(dealt, np.zeros(0), labels, dataset.class_names, from_data=True)
    else:
        if p.kind is PartitionKind.iid:
            weights = np.ones((num_classes, p.num_nodes))
        else:
            weights = _classes_per_node_weights(num_classes, p.num_nodes, p.classes_per_node, rng)
        nodes = _nodes(_deal(split, labels, weights, rng), weights, labels,
                       dataset.class_names, from_data=False)
        _check_nodes(nodes, p.min_samples_per_node)
    partition = Partition(nodes=nodes, class_names=list(dataset.class_names),
                          clips=list(dataset.clips))
    shared = partition.shared_recordings()
    if shared:
        log.warning("%d source recording(s) (src_file) of %s have clips in more than one of "
                    "train/val/test: its folds split recordings, so test clips may share a "
                    "recording with training clips; use folds that keep recordings whole or "
                    "dataset.split=ratio", shared, dataset.root)
    return partition
