"""``medblip_pretrain``: ITC(image, EHR) + ITC(image, Q&A) + λ·LM, each term logged."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from lavis.common.registry import registry

from lavis_medblip.tasks.base import LOSS_TERMS, MedBLIPTask

logger = logging.getLogger(__name__)


@registry.register_task("medblip_pretrain")
class MedBLIPPretrainTask(MedBLIPTask):
    """Validation reports the mean loss terms; ``agg_metrics`` is minus the total loss."""

    def valid_step(self, model: torch.nn.Module, samples: dict[str, Any]) -> list[dict]:
        output = model(samples)
        count = len(samples["text_input"])
        # a term switched off (weight 0), or without an answered row in this batch, is not reported
        return [{"count": count, **{term: float(output[term]) * count for term in LOSS_TERMS
                                    if output.get(term) is not None}}]

    def after_evaluation(self, val_result: list[dict], split_name: str, epoch: Any, **kwargs: Any) -> dict | None:
        merged, _ = self.gather_results(val_result, split_name, epoch, name="losses", unique_key="")
        if merged is None:
            return None
        count = sum(row["count"] for row in merged)
        # each term's mean over the batches that report it
        metrics = {term: sum(row[term] for row in merged if term in row)
                   / max(sum(row["count"] for row in merged if term in row), 1)
                   for term in LOSS_TERMS if any(term in row for row in merged)}
        metrics.update(agg_metrics=-metrics["loss"], num_samples=count, **self.eval_skip_counts(split_name))
        with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a") as handle:
            handle.write(json.dumps({split_name: metrics}) + "\n")
        return metrics
