"""Diagnosis metrics against a case worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from lavis_medblip.tasks.metrics import (INVALID, balanced_accuracy_difference, classification_metrics,
                                         match_generated_answer, roc_auc)

CLASSES = ["NC", "MCI", "AD"]
ANSWERS = ["not demented", "mild cognitive impairment", "Alzheimer's disease"]


def test_metrics_of_six_subjects_with_one_invalid_answer():
    labels = [0, 0, 1, 1, 2, 2]
    predictions = [0, 1, 1, INVALID, 2, 0]
    metrics = classification_metrics(labels, predictions, CLASSES)

    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 2) / 3)
    # precision NC 1/2, MCI 1/2, AD 1/1; recall 1/2 each; F1 = 0.5, 0.5, 2/3
    assert [metrics["per_class"][c]["precision"] for c in CLASSES] == pytest.approx([0.5, 0.5, 1.0])
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert metrics["num_invalid"] == 1
    assert metrics["confusion_matrix"]["columns"] == ["NC", "MCI", "AD", "invalid"]
    assert metrics["confusion_matrix"]["counts"] == [[1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 0]]


def test_auroc_counts_ties_as_half():
    ad_scores = np.array([0.1, 0.4, 0.2, 0.3, 0.9, 0.4])  # subjects 4 and 5 have AD
    # 0.9 beats all four negatives; 0.4 beats three and ties one: (4 + 3.5) / 8
    assert roc_auc(ad_scores, np.array([False] * 4 + [True] * 2)) == pytest.approx(7.5 / 8)
    scores = np.stack([1 - ad_scores, np.zeros(6), ad_scores], axis=1)
    metrics = classification_metrics([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], CLASSES, scores=scores)
    assert metrics["auroc"]["AD"] == pytest.approx(7.5 / 8)
    assert metrics["auroc"]["MCI"] == pytest.approx(0.5)  # constant scores: every pair ties


def test_a_difference_in_balanced_accuracy_comes_with_a_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 75)
    guesses = rng.integers(0, 3, 75)
    model_a = np.where(rng.random(75) < 0.6, labels, guesses)  # right on ~60% of subjects beyond chance
    model_b = model_a.copy()
    model_b[:6] = np.where(model_a[:6] == labels[:6], (labels[:6] + 1) % 3, model_a[:6])  # wrong on 6 more at most

    difference = balanced_accuracy_difference(labels, model_a, model_b)

    expected = (classification_metrics(labels, model_a, CLASSES)["balanced_accuracy"]
                - classification_metrics(labels, model_b, CLASSES)["balanced_accuracy"])
    assert difference.estimate == pytest.approx(expected) and expected > 0
    assert difference.low <= difference.estimate <= difference.high and difference.level == 0.95
    # paired: the subjects both get right or wrong cancel, so the interval is far narrower than either model's own
    assert difference.high - difference.low < 0.15
    assert balanced_accuracy_difference(labels, model_a, model_b) == difference  # by seed
    same = balanced_accuracy_difference(labels, model_a, model_a)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="predictions for each of the 75 labels"):
        balanced_accuracy_difference(labels, model_a, model_b[:-1])


@pytest.mark.parametrize("text, expected", [
    ("The subject will be diagnosed with Alzheimer's disease.", 2),
    ("not demented", 0),
    ("AD, given hippocampal atrophy", 2),
    ("mild cognitive impairment or Alzheimer's disease", INVALID),  # two classes named
    ("MCIs are common", INVALID),  # whole words only
    ("unclear", INVALID),
])
def test_generated_answers_are_matched_to_one_class_or_invalid(text, expected):
    assert match_generated_answer(text, ANSWERS, CLASSES) == expected
