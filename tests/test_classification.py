"""Zero-shot metrics against scikit-learn and hand-computed values."""

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    top_k_accuracy_score,
)
from sklearn.metrics import (
    confusion_matrix as sk_confusion,
)

from flcore.metrics.classification import (
    classification_metrics,
    confusion_matrix,
    per_class_accuracy,
    zero_shot_scores,
)


def test_small_example_by_hand() -> None:
    y_true = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1],
                           [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.3, 0.1]])
    # predictions: 0, 1, 1, 1, 0, 1
    m = classification_metrics(y_true, scores, k=2)
    assert m["acc"] == pytest.approx(3 / 6)
    assert m["balanced_acc"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    f1 = [2 * 1 / (2 + 2), 2 * 2 / (2 + 4), 0.0]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    # top-2 sets: {0,1},{1,0},{1,0},{1,2},{0,2},{1,0} -> hits 1,1,1,1,1,0
    assert m["top2"] == pytest.approx(5 / 6)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scikit_learn_on_random_predictions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 7, size=200)
    y_true[:3] = [0, 1, 2]
    scores = rng.random((200, 8))
    m = classification_metrics(torch.from_numpy(y_true), torch.from_numpy(scores))
    y_pred = scores.argmax(1)
    assert m["acc"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(y_true, scores, k=5,
                                                           labels=np.arange(8)))
    cm = confusion_matrix(torch.from_numpy(y_true), torch.from_numpy(y_pred), 8).numpy()
    np.testing.assert_array_equal(cm, sk_confusion(y_true, y_pred, labels=np.arange(8)))
    recall = per_class_accuracy(torch.from_numpy(y_true), torch.from_numpy(y_pred), 8).numpy()
    assert np.isnan(recall[7])
    np.testing.assert_allclose(recall[:7], np.diag(cm)[:7] / cm.sum(1)[:7])


def test_zero_shot_scores_are_cosines() -> None:
    e = torch.tensor([[3.0, 4.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(zero_shot_scores(e, p), torch.tensor([[0.6, 0.8]]))
