"""Zero-shot classification and its metrics, with scikit-learn's definitions.

``balanced_acc`` is the mean recall over classes present in ``y_true``; ``macro_f1`` averages F1
over the classes present in ``y_true`` or ``y_pred`` (a class never predicted scores 0).
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def zero_shot_scores(embeddings: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[N, K]`` of each embedding with each prompt embedding."""
    return F.normalize(embeddings, dim=-1) @ F.normalize(prompts, dim=-1).T


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes, num_classes]`` counts; rows are true classes, columns predictions."""
    flat = y_true.long() * num_classes + y_pred.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_metrics(y_true: torch.Tensor, scores: torch.Tensor,
                           k: int = 5) -> dict[str, float]:
    """``acc``, ``balanced_acc``, ``macro_f1`` and ``top{k}`` of scores ``[N, K]`` for labels
    ``y_true`` in ``[0, K)``."""
    num_classes = scores.shape[1]
    y_pred = scores.argmax(1)
    cm = confusion_matrix(y_true, y_pred, num_classes).double()
    support, predicted, hits = cm.sum(1), cm.sum(0), cm.diagonal()
    present = support > 0
    recall = hits[present] / support[present]
    either = present | (predicted > 0)
    f1 = 2 * hits[either] / (support[either] + predicted[either])
    top = min(k, num_classes)
    in_top = (scores.topk(top, dim=1).indices == y_true[:, None]).any(1)
    return {
        "acc": (y_pred == y_true).double().mean().item(),
        "balanced_acc": recall.mean().item(),
        "macro_f1": f1.mean().item(),
        f"top{k}": in_top.double().mean().item(),
    }


def per_class_accuracy(y_true: torch.Tensor, y_pred: torch.Tensor,
                       num_classes: int) -> torch.Tensor:
    """Recall of each class (NaN for a class without test clips)."""
    cm = confusion_matrix(y_true, y_pred, num_classes).double()
    return cm.diagonal() / cm.sum(1)


def save_confusion_png(matrix: np.ndarray, names: list[str], path: Path,
                       split: str = "test") -> Path:
    """A row-normalized confusion matrix as a PNG (rows: true class, columns: prediction), with
    each cell's count, a colorbar of the row share and a title naming the ``split``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix.sum(1, keepdims=True)
    normalized = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    size = max(4.0, 0.45 * len(names) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalized, vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if len(names) <= 50:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, str(int(count)), ha="center", va="center", fontsize=6,
                        color="white" if normalized[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Global adapter on the {split} split ({int(matrix.sum())} clips; cells: "
                 "counts)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
