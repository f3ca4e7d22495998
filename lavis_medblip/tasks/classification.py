"""``medblip_classification``: zero-shot (or fine-tuned) NC / MCI / AD diagnosis, by ranking the class
answers or by free generation, with per-sample results, metrics, a confusion matrix and a reliability
diagram; optionally with probabilities calibrated on a held-out split (:mod:`lavis_medblip.tasks.calibrate`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import numpy as np
import torch

from lavis.common.registry import registry

from lavis_medblip.models.calibration import Calibration
from lavis_medblip.tasks.base import MedBLIPTask
from lavis_medblip.tasks.calibrate import CalibrationSplit, calibration_metrics
from lavis_medblip.tasks.metrics import classification_metrics, match_generated_answer
from lavis_medblip.visualize import plot_confusion_matrix, plot_reliability_diagram

logger = logging.getLogger(__name__)
MODES = ("rank", "generate")


@dataclass
class ClassificationOptions:
    """The ``run`` keys ``medblip_classification`` reads, with their defaults."""

    classification_mode: str = field(default="rank", metadata={
        "help": "rank: the class whose answer the LM finds most likely; generate: free generation matched to a class"})
    max_new_tokens: int = field(default=16, metadata={"help": "generate mode: the answer's token limit"})
    num_beams: int = field(default=1, metadata={"help": "generate mode: beam width (1: greedy)"})
    calibration_split: str | None = field(default=None, metadata={
        "help": "a held-out split of the training sites (e.g. val, neither a train nor a test split) on which a "
                "temperature and a per-class bias are fit to the tested model's scores before the test splits are "
                "evaluated; they are applied to every test split and saved with the weights to "
                "<run folder>/checkpoint_calibrated.pth. null: no fit (a checkpoint's own calibration still applies)"})

    def __post_init__(self) -> None:
        if self.classification_mode not in MODES:
            raise ValueError(f"run.classification_mode must be one of {MODES}, got {self.classification_mode!r}")

    @classmethod
    def from_run_config(cls, run_cfg: Mapping[str, Any]) -> "ClassificationOptions":
        return cls(**{item.name: run_cfg.get(item.name, item.default) for item in fields(cls)})


@registry.register_task("medblip_classification")
class MedBLIPClassificationTask(MedBLIPTask):
    """Diagnosis in one of two modes (``run.classification_mode``):

    - ``rank`` (default): the class whose answer the LM finds most likely (length-normalised), a
      deterministic classifier;
    - ``generate``: the paper's free generation, matched to a class by name; an answer that names no
      class (or several) goes to a separate "invalid" bucket. Ranking scores are still computed, for AUROC.

    Writes a per-sample results file (id, label, prediction, raw scores, probabilities, generated text),
    the metrics as JSON, the confusion matrix and the reliability diagram as PNGs, all under the run's
    ``result`` folder. Probabilities and predictions follow the model's calibration (``run.calibration_split``,
    or the checkpoint's); the metrics JSON then also has the uncalibrated ones under ``raw``.
    """

    def __init__(self, options: ClassificationOptions | None = None):
        super().__init__()
        self.options = options or ClassificationOptions()
        self.class_names: list[str] = []
        self.class_answers: list[str] = []
        self.calibration_split: CalibrationSplit | None = None
        self.applied_calibration = Calibration()  # the model's, as the split being evaluated was scored

    @property
    def mode(self) -> str:
        return self.options.classification_mode

    @classmethod
    def setup_task(cls, cfg: Any = None, **kwargs: Any) -> "MedBLIPClassificationTask":
        return cls(ClassificationOptions.from_run_config(cfg.run_cfg if cfg is not None else {}))

    def build_datasets(self, cfg: Any) -> dict:
        datasets = super().build_datasets(cfg)
        name = self.options.calibration_split
        if name is not None:
            self.calibration_split = CalibrationSplit.from_datasets(name, datasets, cfg.run_cfg)
        return datasets

    def before_evaluation(self, model: torch.nn.Module, dataset: Any, **kwargs: Any) -> None:
        # a ConcatDataset of several cohorts must share their classes
        first = dataset.datasets[0] if hasattr(dataset, "datasets") else dataset
        self.class_names, self.class_answers = list(first.class_names), list(first.class_answers)
        if self.calibration_split is not None and self.calibration_split.is_test(dataset):
            self.calibration_split.calibrate(model, self.class_names, self.class_answers)
        self.applied_calibration = model.calibration

    def valid_step(self, model: torch.nn.Module, samples: dict[str, Any]) -> list[dict]:
        ranking = model.predict_answers(samples, self.class_answers)
        predictions = [self.class_answers.index(answer) for answer in ranking.predictions]  # calibrated
        generated = [None] * len(predictions)
        if self.mode == "generate":
            generated = model.generate(samples, max_new_tokens=self.options.max_new_tokens,
                                       num_beams=self.options.num_beams)
            predictions = [match_generated_answer(text, self.class_answers, self.class_names) for text in generated]
        return [
            {"instance_id": instance_id, "label": int(label), "prediction": int(prediction),
             "scores": [round(float(v), 6) for v in scores], "probs": [round(float(v), 6) for v in probs],
             "generated": text}
            for instance_id, label, prediction, scores, probs, text in zip(
                samples["instance_id"], samples["label"].tolist(), predictions, ranking.scores, ranking.probs, generated)
        ]

    def after_evaluation(self, val_result: list[dict], split_name: str, epoch: Any, **kwargs: Any) -> dict | None:
        merged, result_file = self.gather_results(val_result, split_name, epoch)
        if merged is None:
            return None
        labels, predictions = [row["label"] for row in merged], [row["prediction"] for row in merged]
        scores = np.array([row["scores"] for row in merged]) if merged else np.zeros((0, len(self.class_names)))
        probs = np.array([row["probs"] for row in merged]) if merged else scores
        metrics = classification_metrics(labels, predictions, self.class_names,
                                         scores=scores if merged else None)
        raw_predictions = scores.argmax(axis=1).tolist() if self.mode == "rank" else predictions  # generated: as is
        metrics.update(calibration_metrics(labels, scores, probs, raw_predictions, self.class_names,
                                           self.applied_calibration))
        if self.calibration_split is not None and self.applied_calibration is self.calibration_split.fitted:
            metrics["calibration"].update(self.calibration_split.report)
        metrics.update(agg_metrics=metrics["balanced_accuracy"], mode=self.mode, **self.eval_skip_counts(split_name),
                       predictions_file=result_file)
        stem = self.write_metrics(metrics, split_name, epoch)
        plot_confusion_matrix(metrics["confusion_matrix"], f"{stem}_confusion.png",
                              title=f"{split_name} ({self.mode}): balanced accuracy {metrics['balanced_accuracy']:.3f}")
        calibrated = " (calibrated)" if metrics["calibration"] else ""
        plot_reliability_diagram(probs, labels, f"{stem}_reliability.png", title=f"{split_name}{calibrated}")
        logger.info("%s: accuracy %.3f, balanced accuracy %.3f, macro-F1 %.3f, ECE %.3f%s, invalid %d", split_name,
                    metrics["accuracy"], metrics["balanced_accuracy"], metrics["macro_f1"], metrics["ece"], calibrated,
                    metrics["num_invalid"])
        return metrics
