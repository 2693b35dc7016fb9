"""Metrics computed at the sites: AUROC, balanced accuracy and Dice."""

from __future__ import annotations

import numpy as np

__all__ = ["auroc", "balanced_accuracy", "dice"]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties half.

    Args:
        scores: (N,) scores of the positive class, or (N, K) class probabilities for
            K > 2 classes (then the macro average of one-vs-rest AUROCs).
        labels: (N,) integer class indices (binary: 1 is positive).

    Returns:
        The AUROC; NaN when a class needed for it is absent from `labels`.

    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.ndim == 2:
        per_class = [auroc(scores[:, k], (labels == k).astype(int)) for k in range(scores.shape[1])]
        return float(np.mean(per_class))
    pos, neg = scores[labels == 1], scores[labels != 1]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    # Mann-Whitney U from mid-ranks, so tied scores count one half.
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order), dtype=np.float64)
    ranks[order] = np.arange(1, len(order) + 1)
    merged = np.concatenate([pos, neg])
    for value in np.unique(merged):
        tied = merged == value
        ranks[tied] = ranks[tied].mean()
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def balanced_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Mean recall over the classes present in `labels` (NaN when `labels` is empty)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    recalls = [float(np.mean(predicted[labels == c] == c)) for c in np.unique(labels)]
    return float(np.mean(recalls)) if recalls else float("nan")


def dice(predicted: np.ndarray, target: np.ndarray) -> float:
    """Dice overlap of two binary masks; 1 when both are empty."""
    p, t = np.asarray(predicted, dtype=bool), np.asarray(target, dtype=bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(p, t).sum()) / denom
