"""Classification and calibration metrics for diagnosis: plain numpy, checked against hand-computed cases
in the tests. Predictions may include ``-1`` ("invalid": a generated answer that matched no class); it counts as
wrong everywhere and has its own column in the confusion matrix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

INVALID = -1


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class, then one "invalid" column."""
    matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for label, prediction in zip(labels, predictions):
        matrix[label, prediction if prediction != INVALID else num_classes] += 1
    return matrix


def roc_auc(positive_scores: np.ndarray, is_positive: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties count half."""
    positives, negatives = positive_scores[is_positive], positive_scores[~is_positive]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def classification_metrics(
    labels: Sequence[int],
    predictions: Sequence[int],
    class_names: Sequence[str],
    scores: np.ndarray | None = None,
) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall, confusion, one-vs-rest AUROC.

    ``scores`` (N × C, higher = more likely) gives the AUROCs; a class absent from ``labels`` gets NaN.
    """
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    num_classes = len(class_names)
    matrix = confusion_matrix(labels, predictions, num_classes)
    true_positives = np.diag(matrix[:, :num_classes]).astype(float)
    support = matrix.sum(axis=1).astype(float)
    predicted = matrix[:, :num_classes].sum(axis=0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, true_positives / support, np.nan)
        precision = np.where(predicted > 0, true_positives / predicted, 0.0)
        f1 = np.where(precision + np.nan_to_num(recall) > 0,
                      2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    metrics = {
        "num_samples": int(len(labels)),
        "accuracy": float((labels == predictions).mean()) if len(labels) else float("nan"),
        "balanced_accuracy": float(np.nanmean(recall[present])) if present.any() else float("nan"),
        "macro_f1": float(np.mean(f1[present])) if present.any() else float("nan"),
        "num_invalid": int((predictions == INVALID).sum()),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": {"labels": list(class_names), "columns": [*class_names, "invalid"],
                             "counts": matrix.tolist()},
    }
    if scores is not None:
        scores = np.asarray(scores, dtype=float)
        metrics["auroc"] = {name: roc_auc(scores[:, i], labels == i) for i, name in enumerate(class_names)}
        valid = [value for value in metrics["auroc"].values() if not np.isnan(value)]
        metrics["macro_auroc"] = float(np.mean(valid)) if valid else float("nan")
    return metrics


@dataclass
class ReliabilityBins:
    """Top-label confidence in ``n_bins`` equal-width bins of (0, 1]: per bin a count, mean confidence, accuracy."""

    edges: np.ndarray  # (n_bins + 1,) from 0 to 1
    counts: np.ndarray  # (n_bins,)
    confidence: np.ndarray  # (n_bins,) mean top probability; NaN in an empty bin
    accuracy: np.ndarray  # (n_bins,) share of correct top labels; NaN in an empty bin

    @property
    def expected_calibration_error(self) -> float:
        """Σ_bins (count / N) · |accuracy − confidence| (0 for no samples)."""
        filled = self.counts > 0
        if not filled.any():
            return 0.0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((self.counts[filled] * gaps).sum() / self.counts.sum())


def reliability_bins(probs: Sequence[Sequence[float]] | np.ndarray, labels: Sequence[int], n_bins: int = 10
                     ) -> ReliabilityBins:
    """Bin each sample's top probability (its confidence) and whether its top class is the label."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"reliability bins need probs (N, classes) and N labels, got {probs.shape} and {labels.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels) if len(probs) else np.zeros(0, dtype=bool)
    # bin i holds confidences in (i/n, (i+1)/n]; a confidence of exactly 0 goes to the first bin
    which = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=n_bins) / counts
        accuracy = np.bincount(which, weights=correct.astype(float), minlength=n_bins) / counts
    return ReliabilityBins(np.linspace(0.0, 1.0, n_bins + 1), counts, mean_confidence, accuracy)


def expected_calibration_error(probs: Sequence[Sequence[float]] | np.ndarray, labels: Sequence[int],
                               n_bins: int = 10) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width bins (Guo et al. 2017)."""
    return reliability_bins(probs, labels, n_bins).expected_calibration_error


def mean_negative_log_likelihood(probs: Sequence[Sequence[float]] | np.ndarray, labels: Sequence[int]) -> float:
    """Mean −log p(true class); probabilities are floored at 1e-12 so that a sure mistake stays finite."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return float("nan")
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


@dataclass(frozen=True)
class Interval:
    """A point estimate and a confidence interval around it."""

    estimate: float
    low: float
    high: float
    level: float = 0.95


def balanced_accuracy_difference(labels: Sequence[int], predictions_a: Sequence[int], predictions_b: Sequence[int],
                                 resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Balanced accuracy of ``a`` minus that of ``b`` on the same samples, with a paired-bootstrap interval.

    Each resample draws the samples with replacement, the same draw for both models, so what the two get
    right on the same samples cancels (Efron and Tibshirani 1993, percentile interval). It measures how
    much the difference moves with the evaluation samples, not with training (seeds, hardware).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not len(labels) or any(len(predictions) != len(labels) for predictions in (predictions_a, predictions_b)):
        raise ValueError(f"balanced_accuracy_difference needs predictions for each of the {len(labels)} labels")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    classes, label_index = np.unique(labels, return_inverse=True)
    label_index = label_index.astype(np.int16)  # (resamples, N) copies of it stay small
    correct = [np.asarray(predictions, dtype=np.int64) == labels for predictions in (predictions_a, predictions_b)]

    def balanced_accuracy(draws: np.ndarray, hits: np.ndarray) -> np.ndarray:  # draws (R, N) → (R,)
        drawn, drawn_hits = label_index[draws], hits[draws]
        recalls = []
        for index in range(len(classes)):
            in_class = drawn == index
            with np.errstate(invalid="ignore", divide="ignore"):  # a class a resample missed: NaN, left out
                recalls.append((in_class & drawn_hits).sum(axis=1) / in_class.sum(axis=1))
        return np.nanmean(np.stack(recalls, axis=1), axis=1)

    everyone = np.arange(len(labels))[None, :]
    estimate = float(balanced_accuracy(everyone, correct[0])[0] - balanced_accuracy(everyone, correct[1])[0])
    draws = np.random.default_rng(seed).integers(0, len(labels), (resamples, len(labels)))
    differences = balanced_accuracy(draws, correct[0]) - balanced_accuracy(draws, correct[1])
    low, high = np.quantile(differences, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high), level)


def match_generated_answer(text: str, class_answers: Sequence[str], class_names: Sequence[str]) -> int:
    """Index of the class a generated answer names, or ``INVALID`` when it names none or several.

    Matches the class answer ("Alzheimer's disease") or the class code ("AD") as whole words,
    case-insensitively.
    """
    lowered = text.lower()
    found = set()
    for index, (answer, name) in enumerate(zip(class_answers, class_names)):
        for phrase in (answer.lower(), name.lower()):
            if re.search(rf"(?<![\w']){re.escape(phrase)}(?![\w'])", lowered):
                found.add(index)
    if len(found) > 1:  # naming two classes is no diagnosis
        return INVALID
    return found.pop() if found else INVALID


# --------------------------------------------------------------------------------------------
# Open-ended VQA: light text-overlap metrics (sentence level, one reference)
# --------------------------------------------------------------------------------------------

def overlap_tokens(text: str) -> list[str]:
    """Lower-cased runs of letters and digits (rouge_score's tokenisation; punctuation is dropped)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _clipped_unigram_overlap(prediction: list[str], reference: list[str]) -> int:
    from collections import Counter

    return sum((Counter(prediction) & Counter(reference)).values())


def bleu_1(prediction: str, reference: str) -> float:
    """BLEU with unigrams only: clipped unigram precision × brevity penalty ``exp(1 - r/c)`` if ``c < r``.

    ``c``/``r`` are the prediction/reference lengths in :func:`overlap_tokens`. An empty prediction
    scores 0. (sacrebleu-style BLEU also counts punctuation tokens, so values differ slightly.)
    """
    import math

    predicted, referenced = overlap_tokens(prediction), overlap_tokens(reference)
    if not predicted or not referenced:
        return 0.0
    precision = _clipped_unigram_overlap(predicted, referenced) / len(predicted)
    brevity = 1.0 if len(predicted) >= len(referenced) else math.exp(1 - len(referenced) / len(predicted))
    return precision * brevity


def rouge_1(prediction: str, reference: str) -> float:
    """ROUGE-1 F1: harmonic mean of clipped unigram precision and recall (no stemming)."""
    predicted, referenced = overlap_tokens(prediction), overlap_tokens(reference)
    overlap = _clipped_unigram_overlap(predicted, referenced)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(referenced)
    return 2 * precision * recall / (precision + recall)


def mean_by_group(values: Sequence[float], groups: Sequence[object]) -> dict[str, dict[str, float]]:
    """``{group: {"mean": …, "num_samples": …}}`` in sorted group order (e.g. accuracy per question type)."""
    totals: dict[object, list[float]] = {}
    for value, group in zip(values, groups):
        totals.setdefault(group, []).append(float(value))
    return {str(group): {"mean": float(np.mean(totals[group])), "num_samples": len(totals[group])}
            for group in sorted(totals)}
