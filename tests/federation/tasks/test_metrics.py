"""Site metrics against values worked out by hand."""

import numpy as np
import pytest

from federation.tasks.metrics import auroc, balanced_accuracy, dice


def test_auroc_counts_ordered_pairs_and_ties_as_half():
    # Positives 0.9, 0.4; negatives 0.4, 0.1, 0.3. Pairs (pos > neg): 0.9 beats all 3;
    # 0.4 beats 0.1 and 0.3 and ties 0.4 (1/2): (3 + 2.5) / 6.
    scores = np.array([0.9, 0.4, 0.4, 0.1, 0.3])
    labels = np.array([1, 1, 0, 0, 0])
    assert auroc(scores, labels) == pytest.approx(5.5 / 6)
    assert auroc(-scores, labels) == pytest.approx(0.5 / 6)
    assert auroc(np.ones(5), labels) == 0.5


def test_auroc_is_undefined_with_one_class():
    assert np.isnan(auroc(np.array([0.2, 0.7]), np.array([1, 1])))


def test_multiclass_auroc_is_the_macro_one_vs_rest_average():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    labels = np.array([0, 1, 2, 1])
    # class 0: pos 0.8 vs neg 0.2, 0.3, 0.5 -> 1; class 1: pos 0.7, 0.4 vs 0.1, 0.3 -> 1;
    # class 2: pos 0.4 vs 0.1, 0.1, 0.1 -> 1.
    assert auroc(probs, labels) == 1.0
    labels = np.array([1, 0, 2, 1])
    # class 0: pos 0.2 vs 0.8, 0.3, 0.5 -> 0; class 1: pos 0.1, 0.4 vs 0.7, 0.3 -> 1/4;
    # class 2: 1.
    assert auroc(probs, labels) == pytest.approx((0 + 0.25 + 1) / 3)


def test_balanced_accuracy_is_the_mean_recall_per_class():
    labels = np.array([0, 0, 0, 0, 1, 1])
    predicted = np.array([0, 0, 0, 1, 1, 0])
    # recall 3/4 for class 0, 1/2 for class 1; plain accuracy would be 4/6.
    assert balanced_accuracy(predicted, labels) == pytest.approx((0.75 + 0.5) / 2)
    assert balanced_accuracy(np.zeros(6, int), labels) == pytest.approx(0.5)


def test_dice_of_masks():
    a = np.array([1, 1, 0, 0])
    b = np.array([1, 0, 1, 0])
    assert dice(a, b) == pytest.approx(2 * 1 / 4)
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
