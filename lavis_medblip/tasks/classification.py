"""``medblip_classification``: zero-shot (or fine-tuned) NC / MCI / AD diagnosis, by ranking the class
answers or by free generation, with per-sample results, metrics and a confusion matrix.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from lavis.common.registry import registry

from lavis_medblip.tasks.base import MedBLIPTask
from lavis_medblip.tasks.metrics import classification_metrics, match_generated_answer
from lavis_medblip.visualize import plot_confusion_matrix

logger = logging.getLogger(__name__)
MODES = ("rank", "generate")


@registry.register_task("medblip_classification")
class MedBLIPClassificationTask(MedBLIPTask):
    """Diagnosis in one of two modes (``run.classification_mode``):

    - ``rank`` (default): the class whose answer the LM finds most likely (length-normalised), a
      deterministic classifier;
    - ``generate``: the paper's free generation, matched to a class by name; an answer that names no
      class (or several) goes to a separate "invalid" bucket. Ranking scores are still computed, for AUROC.

    Writes a per-sample results file (id, label, prediction, scores, generated text), the metrics as
    JSON and the confusion matrix as PNG, all under the run's ``result`` folder.
    """

    def __init__(self, mode: str = "rank", max_new_tokens: int = 16, num_beams: int = 1):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"classification_mode must be one of {MODES}, got {mode!r}")
        self.mode, self.max_new_tokens, self.num_beams = mode, max_new_tokens, num_beams
        self.class_names: list[str] = []
        self.class_answers: list[str] = []

    @classmethod
    def setup_task(cls, cfg: Any = None, **kwargs: Any) -> "MedBLIPClassificationTask":
        run_cfg = cfg.run_cfg if cfg is not None else {}
        return cls(mode=run_cfg.get("classification_mode", "rank"),
                   max_new_tokens=run_cfg.get("max_new_tokens", 16), num_beams=run_cfg.get("num_beams", 1))

    def before_evaluation(self, model: torch.nn.Module, dataset: Any, **kwargs: Any) -> None:
        # a ConcatDataset of several cohorts must share their classes
        first = dataset.datasets[0] if hasattr(dataset, "datasets") else dataset
        self.class_names, self.class_answers = list(first.class_names), list(first.class_answers)

    def valid_step(self, model: torch.nn.Module, samples: dict[str, Any]) -> list[dict]:
        ranking = model.predict_answers(samples, self.class_answers)
        predictions = ranking.scores.argmax(dim=1).tolist()
        generated = [None] * len(predictions)
        if self.mode == "generate":
            generated = model.generate(samples, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
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
        metrics = classification_metrics(
            [row["label"] for row in merged], [row["prediction"] for row in merged], self.class_names,
            scores=np.array([row["scores"] for row in merged]) if merged else None,
        )
        metrics.update(agg_metrics=metrics["balanced_accuracy"], mode=self.mode, **self.eval_skip_counts(split_name),
                       predictions_file=result_file)
        stem = self.write_metrics(metrics, split_name, epoch)
        plot_confusion_matrix(metrics["confusion_matrix"], f"{stem}_confusion.png",
                              title=f"{split_name} ({self.mode}): balanced accuracy {metrics['balanced_accuracy']:.3f}")
        logger.info("%s: accuracy %.3f, balanced accuracy %.3f, macro-F1 %.3f, invalid %d", split_name,
                    metrics["accuracy"], metrics["balanced_accuracy"], metrics["macro_f1"], metrics["num_invalid"])
        return metrics
