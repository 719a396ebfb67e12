"""Scoring the nodes' generators against held-out real embeddings (``gen/*``, docs/metrics.md).

Each node's generators are scored on what the node would hold out: its validation clips of each
class (its test clips when it has no validation split), pooled to the rows the generators model.
Generated rows are the synthetic samples the node shared; training rows (for memorization) are
the rows the generators trained on. Nothing here reaches the training loop.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flcore.clients.clientA2V import ClientA2V
from flcore.clients.protocol import SharedTensors
from flcore.config import Config
from flcore.data.partition import scoring_split
from flcore.errors import TrainingError
from flcore.metrics.generative import (
    NonFiniteRows,
    evaluate_diversity,
    evaluate_quality,
    generator_report,
    kl_per_dimension,
    latent_usage,
)
from flcore.trainmodel.generators import GeneratorBank, generator_rows

#: Metrics also scored for the training rows themselves (``gen/train_rows/*``).
REFERENCE_METRICS = ("precision", "recall", "density", "coverage", "pairwise_distance")


@dataclass
class GeneratorQuality:
    """One scoring: the ``gen/*`` scalars, the per-class table, undefined metrics with their
    reasons, and each generator's KL per latent dimension."""

    scalars: dict[str, float] = field(default_factory=dict)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    undefined: dict[str, Any] = field(default_factory=dict)
    kl_per_dimension: dict[str, list[float]] = field(default_factory=dict)
    held_out: dict[str, str] = field(default_factory=dict)


def held_out(client: ClientA2V) -> tuple[torch.Tensor, str]:
    """The node's clips that score its generators: validation, else test."""
    split = scoring_split(client.val_idx, client.test_idx)
    return (client.val_idx if split == "val" else client.test_idx), split


def _latent(client: ClientA2V, rows: torch.Tensor, labels: torch.Tensor,
            shared: SharedTensors, quality: GeneratorQuality) -> list[dict[str, float | None]]:
    """Active units and total KL of each of the node's VAE generators on its training ``rows``
    with class ids ``labels`` (none for the Gaussian floor, which has no latent code); fills
    ``quality.kl_per_dimension``."""
    bank = client.generators
    if not isinstance(bank, GeneratorBank):
        return []
    prompts = shared.prompts if bank.model.cond else None
    data = bank.data(rows, labels, prompts)
    with torch.no_grad():
        mu, logvar = bank.model.encode(data.x, data.cond)
    usage = []
    for g, name in enumerate(bank.spec.names):
        n = int(data.counts[g])
        if name in bank.dropped or n == 0:
            continue
        where = f"node {client.node}, generator {name}"
        scores = latent_usage(mu[g, :n], logvar[g, :n], where=where)
        usage.append(scores.values)
        quality.kl_per_dimension[f"node{client.node}/{name}"] = (
            kl_per_dimension(mu[g, :n], logvar[g, :n]).tolist())
    return usage


def score_generators(clients: list[ClientA2V], synthetic: dict[int, tuple[torch.Tensor,
                                                                          torch.Tensor]],
                     shared: SharedTensors, config: Config, round_: int) -> GeneratorQuality:
    """Score every node's generators and shared samples, per class and pooled over the
    federation; ``gen/active_units`` and ``gen/kl`` are means over generators and
    ``gen/spread_ratio`` the mean over classes. NaN or infinite samples or posteriors (the
    metrics' NonFiniteRows) stop the run as a TrainingError."""
    try:
        return _score_generators(clients, synthetic, shared, config, round_)
    except NonFiniteRows as err:
        raise TrainingError(str(err)) from err


def _score_generators(clients: list[ClientA2V], synthetic: dict[int, tuple[torch.Tensor,
                                                                           torch.Tensor]],
                      shared: SharedTensors, config: Config, round_: int) -> GeneratorQuality:
    quality = GeneratorQuality()
    real: dict[str, torch.Tensor] = {}
    generated: dict[str, torch.Tensor] = {}
    train: dict[str, torch.Tensor] = {}
    usage: list[dict[str, float | None]] = []
    g = config.generator
    for client in clients:
        if client.generators is None or client.node not in synthetic:
            continue
        idx, split = held_out(client)
        quality.held_out[f"node{client.node}"] = split
        real_rows = generator_rows(shared.tokens[idx], g.sequence_length)
        train_rows = client.generator_inputs(shared, g, None)
        train_labels = shared.labels[client.train_idx]
        x, y = synthetic[client.node]
        rows = x.reshape(len(x), -1)
        for c in sorted(set(train_labels.tolist())):
            key = f"node{client.node}/{shared.class_names[c]}"
            real[key] = real_rows[shared.labels[idx] == c]
            generated[key] = rows[y == c]
            train[key] = train_rows[train_labels == c]
        usage += _latent(client, train_rows, train_labels, shared, quality)
    if not generated:
        return quality
    e = config.eval
    report = generator_report(real, generated, train, where=f"round {round_}", k=e.prdc_k,
                              permutations=e.mmd_permutations, max_rows=e.max_rows,
                              seed=config.seed)
    quality.scalars = {f"gen/{k}": float(v) for k, v in report["pooled"].items()
                       if v is not None}
    spreads = [v["spread_ratio"] for v in report["per_class"].values()
               if v.get("spread_ratio") is not None]
    if spreads:
        # Pooled rows spread over every class, which hides a generator that draws each class's
        # mean: the spread is a within-class figure, averaged over classes.
        quality.scalars["gen/spread_ratio"] = float(np.mean(spreads))
    quality.scalars.update(train_rows_reference(real, train, e.prdc_k, config.seed))
    for key in ("active_units", "kl"):
        values = [u[key] for u in usage if u.get(key) is not None]
        if values:
            quality.scalars[f"gen/{key}"] = float(np.mean(values))
    quality.per_class = [{"node": int(key.split("/")[0][4:]), "class": key.split("/", 1)[1],
                          **values} for key, values in report["per_class"].items()]
    quality.undefined = report["undefined"]
    return quality


def train_rows_reference(real: dict[str, torch.Tensor], train: dict[str, torch.Tensor], k: int,
                         seed: int) -> dict[str, float]:
    """``gen/train_rows/*``: the pooled manifold metrics of the generators' own training rows
    scored as if they were samples, i.e. what a generator that reproduces its rows exactly gets.
    Held-out clips come from other recordings, so this, not 1.0, is the level a faithful
    generator's ``gen/recall`` and ``gen/coverage`` are read against."""
    held, rows = torch.cat(list(real.values())), torch.cat(list(train.values()))
    if len(held) <= k or len(rows) <= k:
        return {}
    scores = evaluate_quality(held, rows, REFERENCE_METRICS, k=k, seed=seed)
    return {f"gen/train_rows/{m}": float(v) for m, v in scores.items() if v is not None}


def evaluate_generator_quality(real_embeddings: torch.Tensor, generated_embeddings: torch.Tensor,
                               metrics: Sequence[str] | None = None,
                               k: int = 5) -> dict[str, float | None]:
    """Generator metrics on demand (docs/metrics.md) of generated rows against real rows, all
    by default; None where undefined. For scripts and notebooks."""
    return evaluate_quality(real_embeddings, generated_embeddings, metrics, k=k)


def evaluate_generator_diversity(generated_embeddings: torch.Tensor) -> dict[str, float]:
    """``std`` (mean per-dimension) and ``pairwise_distance`` of generated rows."""
    return evaluate_diversity(generated_embeddings)
