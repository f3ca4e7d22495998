"""The EHR-fields baseline: a logistic regression on the recorded EHR values, the measure of what the text
holds (scikit-learn). A text-only LM that reads the EHR should come near it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from lavis_medblip.annotations.ehr import is_missing, sex_of
from lavis_medblip.annotations.schema import CLASS_NAMES, EHR_FIELDS, AnnotationRecord
from lavis_medblip.tasks.metrics import classification_metrics, expected_calibration_error

#: The schema's numeric EHR fields; each also gets a missing-value indicator (a field no record has adds nothing).
NUMERIC_FIELDS = tuple(name for name in EHR_FIELDS if name != "sex")


def ehr_features(records: Iterable[AnnotationRecord]) -> np.ndarray:
    """Per record: each numeric field and whether it is missing, then sex (male) and whether it is missing."""
    rows = []
    for record in records:
        row: list[float] = []
        for name in NUMERIC_FIELDS:
            value = record.ehr.get(name)
            missing = is_missing(value)
            row += [np.nan if missing else float(value), float(missing)]
        sex = record.ehr.get("sex")
        row += [float(sex_of(sex) == "male"), float(is_missing(sex))]
        rows.append(row)
    return np.asarray(rows, dtype=float)


def logistic_regression(regularisation: float = 1.0) -> Any:
    """The baselines' classifier (scikit-learn): missing values at the mean, standardised features, multinomial
    logistic regression with ``C=regularisation``; unfitted."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(SimpleImputer(strategy="mean", keep_empty_features=True), StandardScaler(),
                         LogisticRegression(C=regularisation, max_iter=2000))


@dataclass
class EHRLogisticRegression:
    """Multinomial logistic regression on :func:`ehr_features`, standardised, missing values at the mean."""

    regularisation: float = 1.0  # scikit-learn's C: inverse L2 strength
    pipeline: Any = None

    def fit(self, records: Sequence[AnnotationRecord]) -> "EHRLogisticRegression":
        labels = [CLASS_NAMES.index(record.label) for record in records]
        self.pipeline = logistic_regression(self.regularisation).fit(ehr_features(records), labels)
        return self

    def predict_proba(self, records: Sequence[AnnotationRecord]) -> np.ndarray:
        """(N, classes) probabilities, in :data:`CLASS_NAMES` order."""
        if self.pipeline is None:
            raise RuntimeError("EHRLogisticRegression.predict_proba before fit")
        return self.pipeline.predict_proba(ehr_features(records))

    def evaluate(self, records: Sequence[AnnotationRecord]) -> dict:
        """The classification task's metrics (balanced accuracy, macro-F1, AUROC, ...) and ``ece``."""
        return self.evaluation(records)["metrics"]

    def evaluation(self, records: Sequence[AnnotationRecord]) -> dict:
        """:meth:`evaluate`'s ``metrics`` and ``predictions`` (:func:`evaluation_of_probabilities`)."""
        return evaluation_of_probabilities(records, self.predict_proba(records))


def evaluation_of_probabilities(records: Sequence[AnnotationRecord], probs: np.ndarray) -> dict:
    """Class probabilities (N, classes; :data:`CLASS_NAMES` order) of a baseline as the evaluation task writes its
    results: ``metrics`` (with ``ece``) and ``predictions``, per record its instance id, label, predicted class and
    probabilities."""
    labels = [CLASS_NAMES.index(record.label) for record in records]
    predictions = probs.argmax(axis=1).tolist()
    metrics = classification_metrics(labels, predictions, CLASS_NAMES, scores=probs)
    metrics["ece"] = expected_calibration_error(probs, labels)
    return {"metrics": metrics, "predictions": [
        {"instance_id": record.instance_id, "label": label, "prediction": prediction, "probs": row.tolist()}
        for record, label, prediction, row in zip(records, labels, predictions, probs)]}
