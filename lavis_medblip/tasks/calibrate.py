"""``run.calibration_split``: calibrate the probabilities of the model that is tested, on a held-out split of
the training sites, before its test splits are evaluated.

The runner evaluates ``run.test_splits`` (``python -m lavis_medblip.evaluate`` evaluates nothing else), so
the task scores the calibration split itself, once, when the first test split is about to be evaluated:
with the weights being tested (after a training run, the best checkpoint). The fitted
:class:`~lavis_medblip.models.calibration.Calibration` is set on the model for every test split and saved
with the weights to ``<run folder>/checkpoint_calibrated.pth``, a checkpoint the predict CLI and
``model.finetuned`` take as they are.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from lavis.common.dist_utils import is_main_process
from lavis.common.registry import registry
from lavis.datasets.data_utils import prepare_sample

from lavis_medblip.models.calibration import Calibration, fit_calibration
from lavis_medblip.tasks.metrics import classification_metrics, expected_calibration_error, mean_negative_log_likelihood

logger = logging.getLogger(__name__)
#: The checkpoint a calibrating run writes into its folder: the tested weights and their calibration.
CALIBRATED_CHECKPOINT = "checkpoint_calibrated.pth"


def raw_scores(model: torch.nn.Module, loader: Any, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw ``predict_answers`` scores (N, C) and labels (N,) of every readable sample of ``loader``."""
    cuda_enabled = next(model.parameters()).device.type == "cuda"
    scores, labels = [torch.zeros(0, len(answers))], [torch.zeros(0, dtype=torch.long)]
    for samples in loader:
        if "image" not in samples:  # every scan of the batch was unreadable (on_error: skip)
            continue
        samples = prepare_sample(samples, cuda_enabled=cuda_enabled)
        scores.append(model.predict_answers(samples, list(answers)).scores.float().cpu())
        labels.append(samples["label"].cpu())
    return torch.cat(scores), torch.cat(labels)


@dataclass
class CalibrationSplit:
    """The split named by ``run.calibration_split`` and, once fit, its calibration and how well it fits there."""

    name: str
    dataset: Any
    test_datasets: list[Any]
    batch_size: int = 1
    num_workers: int = 0
    fitted: Calibration | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_datasets(cls, name: str, datasets: Mapping[str, Mapping[str, Any]], run_cfg: Any) -> "CalibrationSplit":
        """Check that ``name`` is a held-out split of one dataset, neither trained nor tested on."""
        test_splits = list(run_cfg.get("test_splits", []) or [])
        key = f"run.calibration_split {name!r}"
        if name in test_splits:
            raise ValueError(f"{key} is one of run.test_splits {test_splits}: fit on the data it is tested on, its "
                             "calibration error would be optimistic; name a held-out split of the training sites "
                             "(e.g. val)")
        if name in list(run_cfg.get("train_splits", []) or []):
            raise ValueError(f"{key} is a training split: the model is over-confident on what it was trained on; "
                             "name a held-out split of the training sites (e.g. val)")
        found = [splits[name] for splits in datasets.values() if name in splits]
        if len(found) != 1:
            available = sorted({split for splits in datasets.values() for split in splits})
            raise ValueError(f"{key}: {len(found)} datasets have that split (one is needed; splits: {available}); "
                             "add it to one dataset's build_info.annotations")
        if not hasattr(found[0], "class_answers"):
            raise ValueError(f"{key}: its dataset {type(found[0]).__name__} has no diagnosis classes")
        tests = [splits[split] for splits in datasets.values() for split in test_splits if split in splits]
        return cls(name, found[0], tests, int(run_cfg.get("batch_size_eval", 1)), int(run_cfg.get("num_workers", 0)))

    def is_test(self, dataset: Any) -> bool:
        """Whether ``dataset`` (as the runner passes it to ``before_evaluation``) is one of the test splits."""
        return any(dataset is test for test in self.test_datasets)

    def calibrate(self, model: torch.nn.Module, class_names: Sequence[str], class_answers: Sequence[str]) -> None:
        """Set ``model.calibration``, fit on the first call (the test phase evaluates one set of weights)."""
        if self.fitted is None:
            self.fit(model, class_names, class_answers)
        model.calibration = self.fitted

    def fit(self, model: torch.nn.Module, class_names: Sequence[str], class_answers: Sequence[str]) -> None:
        if list(self.dataset.class_names) != list(class_names):
            raise ValueError(f"run.calibration_split {self.name!r} has classes {list(self.dataset.class_names)}, "
                             f"the test split {list(class_names)}: a calibration is fit per class")
        model.calibration = Calibration()  # fit on the raw scores, whatever the checkpoint held
        # no sampler: every rank scores the whole split and fits the same calibration, with no gathering
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=getattr(self.dataset, "collater", None))
        scores, labels = raw_scores(model, loader, class_answers)
        if len(labels) == 0:
            raise ValueError(f"run.calibration_split {self.name!r}: no readable sample to fit a calibration on")
        self.fitted = fit_calibration(scores, labels, answers=class_answers)
        raw, calibrated = scores.softmax(dim=1).numpy(), self.fitted.apply(scores).numpy()
        self.report = {"split": self.name,
                       "fit_nll_raw": mean_negative_log_likelihood(raw, labels),
                       "fit_nll": mean_negative_log_likelihood(calibrated, labels),
                       "fit_ece_raw": expected_calibration_error(raw, labels),
                       "fit_ece": expected_calibration_error(calibrated, labels)}
        if is_main_process():
            model.calibration = self.fitted
            path = Path(registry.get_path("output_dir")) / CALIBRATED_CHECKPOINT
            model.save_checkpoint(path)
            self.report["checkpoint"] = str(path)
        logger.info("calibration fit on %s: %s; NLL %.3f -> %.3f, ECE %.3f -> %.3f there", self.name,
                    self.fitted.describe(), self.report["fit_nll_raw"], self.report["fit_nll"],
                    self.report["fit_ece_raw"], self.report["fit_ece"])


def calibration_metrics(labels: Sequence[int], scores: np.ndarray, probs: np.ndarray, raw_predictions: Sequence[int],
                        class_names: Sequence[str], applied: Calibration) -> dict[str, Any]:
    """``ece`` and ``nll`` of the reported ``probs``; with a calibration applied, also ``calibration`` (its
    values) and ``raw`` (accuracy, balanced accuracy, macro-F1, ECE and NLL of the uncalibrated ranking)."""
    metrics: dict[str, Any] = {"ece": expected_calibration_error(probs, labels),
                               "nll": mean_negative_log_likelihood(probs, labels), "calibration": None}
    if applied.is_identity:
        return metrics
    raw_probs = torch.as_tensor(scores, dtype=torch.float64).softmax(dim=-1).numpy()
    raw = classification_metrics(labels, raw_predictions, class_names)
    metrics["calibration"] = applied.to_dict()
    metrics["raw"] = {**{key: raw[key] for key in ("accuracy", "balanced_accuracy", "macro_f1")},
                      "ece": expected_calibration_error(raw_probs, labels),
                      "nll": mean_negative_log_likelihood(raw_probs, labels)}
    return metrics
