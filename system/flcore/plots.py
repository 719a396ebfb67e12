"""PNG plots of a run for a person reading its folder: metrics over rounds, and the generators'
loss terms and beta over generator epochs."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

MARKERS = ("o", "s", "^", "D", "v")
STYLES = ("-", "--", "-.", ":", (0, (5, 1)))
ROUND_METRICS = ("global/acc", "val/acc", "local/acc_mean", "synthetic/acc",
                 "synthetic/prompt_acc")
EPOCH_METRICS = ("generator/recon_loss", "generator/mse", "generator/kl_loss",
                 "generator/weighted_kl",
                 "generator/similarity_loss", "generator/beta")


def _series(rows: list[dict[str, Any]], x: str, key: str) -> tuple[list[float], list[float]]:
    points = [(row[x], row[key]) for row in rows if row.get(key) is not None and x in row]
    return [p[0] for p in points], [p[1] for p in points]


def plot_rounds(rounds: list[dict[str, Any]], path: Path) -> Path | None:
    """Accuracies over rounds (one line per key present); None when no round was evaluated."""
    present = [k for k in ROUND_METRICS if any(k in r for r in rounds)]
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, key in enumerate(present):
        # Curves often coincide (local/acc_mean is global/acc under FedAvg): each later one is
        # thinner, dashed and hollow-marked, so every curve stays visible over the earlier ones.
        ax.plot(*_series(rounds, "round", key), label=key, marker=MARKERS[i % len(MARKERS)],
                markersize=7 - i, markerfacecolor="none", linewidth=2.5 - 0.4 * i,
                linestyle=STYLES[i % len(STYLES)], zorder=len(present) + i)
    ax.set_xlabel("round")
    ax.set_ylabel("zero-shot top-1 accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_generator_epochs(epochs: list[dict[str, Any]], path: Path) -> Path | None:
    """Each loss term (log scale where positive) and beta over generator epochs, one panel
    each; None without generator epochs."""
    present = [k for k in EPOCH_METRICS if any(k in e for e in epochs)]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 1, figsize=(6, 1.8 * len(present)), sharex=True,
                             squeeze=False)
    for ax, key in zip(axes[:, 0], present, strict=True):
        x, y = _series(epochs, "generator/epoch", key)
        ax.plot(x, y, linewidth=1)
        if key != "generator/beta" and y and min(y) > 0:
            ax.set_yscale("log")
        ax.set_ylabel(key.split("/")[-1], fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("generator epoch")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_kl_per_dimension(kl: dict[str, list[float]], path: Path) -> Path | None:
    """KL per latent dimension of each generator, sorted high to low (a collapsed generator is
    a flat line at 0; an active unit stands out); None without generators."""
    if not kl:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in kl.items():
        ax.plot(sorted(values, reverse=True), linewidth=1, label=name if len(kl) <= 12 else None)
    ax.set_xlabel("latent dimension (sorted by KL)")
    ax.set_ylabel("KL (nats)")
    ax.grid(alpha=0.3)
    if len(kl) <= 12:
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_sweep_metric(path: Path, lines: dict[str, list[tuple[float, float, float]]],
                      x_key: str, metric: str, references: list[tuple[float, str]]) -> Path:
    """``metric`` against ``x_key``: one line per label of (x, mean, 95% CI half-width) points,
    error bars where a half-width is known, and a dashed line per (value, name) reference."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in lines.items():
        xs, means, halves = zip(*sorted(points), strict=True)
        ax.errorbar(xs, means, yerr=halves if any(halves) else None, marker="o", capsize=3,
                    label=label or None)
    _references(ax, references)
    if any(lines) or references:
        ax.legend(fontsize="small")
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {x_key}\nmean over seeds, error bars: 95% CI (Student t)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_sweep_rounds(path: Path, curves: dict[str, list[tuple[int, float, float]]],
                      metric: str, references: list[tuple[float, str]]) -> Path:
    """``metric`` per round, one line per arm label of (round, mean, 95% CI half-width) points
    with the interval as a band, so that convergence speed is visible."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        rounds, means, halves = (list(v) for v in zip(*points, strict=True))
        (line,) = ax.plot(rounds, means, marker="o", markersize=3, label=label or metric)
        ax.fill_between(rounds, [m - h for m, h in zip(means, halves, strict=True)],
                        [m + h for m, h in zip(means, halves, strict=True)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    _references(ax, references)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per round\nmean over seeds, band: 95% CI (Student t)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _references(ax: Any, references: list[tuple[float, str]]) -> None:
    """A dashed horizontal line per (value, name)."""
    for value, name in references:
        ax.axhline(value, color="gray", linestyle="--", linewidth=1, label=name)
