"""``medblip_vqa``: closed- and open-ended VQA on M3D-VQA (the paper's Table 3: M3D-VQA-AD,
closed-ended), scored overall and per question type.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import torch

from lavis.common.registry import registry

from lavis_medblip.annotations.m3d_vqa import QUESTION_TYPES, format_choice
from lavis_medblip.tasks.base import MedBLIPTask
from lavis_medblip.tasks.metrics import bleu_1, mean_by_group, overlap_tokens, rouge_1

logger = logging.getLogger(__name__)
METHODS = ("rank", "letter")
_LETTER_IN_TEXT = re.compile(r"\b([A-D])\.")


def subset_samples(samples: dict[str, Any], indices: Sequence[int]) -> dict[str, Any]:
    """The samples at ``indices`` of a collated batch (tensors and per-sample lists alike)."""
    picked: dict[str, Any] = {}
    for key, value in samples.items():
        if torch.is_tensor(value) and value.dim() > 0:
            picked[key] = value.index_select(0, torch.tensor(list(indices), device=value.device))
        elif isinstance(value, list):
            picked[key] = [value[i] for i in indices]
        else:
            picked[key] = value
    return picked


def per_type_summary(values: Sequence[float], question_types: Sequence[int]) -> dict[str, dict[str, float]]:
    """``{"1 Plane": {"mean": …, "num_samples": …}, …}`` for the types present."""
    return {f"{number} {QUESTION_TYPES.get(int(number), '?')}": summary
            for number, summary in mean_by_group(values, question_types).items()}


@registry.register_task("medblip_vqa")
class MedBLIPVQATask(MedBLIPTask):
    """VQA scored as the dataset's ``mode`` (``m3d_vqa``: ``closed`` | ``open``) says.

    Closed-ended, ``run.vqa_method``:

    - ``rank`` (default): each sample's choices ``"{letter}. {choice}"`` are ranked by the LM's
      length-normalised log-likelihood (``predict_answers``); correct when the best is the answer's
      letter. Deterministic, and always yields one of the choices.
    - ``letter``: M3D's own rule: greedy generation (``run.max_new_tokens``, M3D uses 256), correct when
      ``answer_choice + "."`` occurs anywhere in the generated text (so a text listing every letter
      counts as correct, exactly as in M3D's scorer).

    Accuracy overall and per question type (1 Plane … 5 Location); ``agg_metrics`` = accuracy.

    Open-ended: greedy generation scored with BLEU-1 and ROUGE-1 (``tasks/metrics.py``) per sample and
    averaged, overall and per type; ``correct`` is a normalised exact match; ``agg_metrics`` = ROUGE-1.

    Writes ``<split>_epoch<e>_predictions.json`` (id, question type, question, answer, prediction,
    correct, …; merged over ranks by LAVIS's ``save_result``) and ``<split>_epoch<e>_metrics.json``
    under the run's ``result`` folder.
    """

    def __init__(self, method: str = "rank", max_new_tokens: int = 256, num_beams: int = 1):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"vqa_method must be one of {METHODS}, got {method!r}")
        self.method, self.max_new_tokens, self.num_beams = method, max_new_tokens, num_beams
        self.mode = "closed"

    @classmethod
    def setup_task(cls, cfg: Any = None, **kwargs: Any) -> "MedBLIPVQATask":
        run_cfg = cfg.run_cfg if cfg is not None else {}
        return cls(method=run_cfg.get("vqa_method", "rank"), max_new_tokens=run_cfg.get("max_new_tokens", 256),
                   num_beams=run_cfg.get("num_beams", 1))

    def before_evaluation(self, model: torch.nn.Module, dataset: Any, **kwargs: Any) -> None:
        first = dataset.datasets[0] if hasattr(dataset, "datasets") else dataset
        self.mode = getattr(first, "mode", "closed")

    # ---- per batch --------------------------------------------------------------------------------
    def valid_step(self, model: torch.nn.Module, samples: dict[str, Any]) -> list[dict]:
        rows = [
            {"instance_id": instance_id, "question_type": int(question_type), "question": question, "answer": answer}
            for instance_id, question_type, question, answer in zip(
                samples["instance_id"], samples["question_type"].tolist(), samples["raw_question"], samples["text_output"])
        ]
        if self.mode == "open":
            self._score_open(model, samples, rows)
        elif self.method == "rank":
            self._score_ranked_choices(model, samples, rows)
        else:
            self._score_generated_letter(model, samples, rows)
        return rows

    def _generate(self, model: torch.nn.Module, samples: dict[str, Any]) -> list[str]:
        return model.generate(samples, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)

    def _score_ranked_choices(self, model: torch.nn.Module, samples: dict[str, Any], rows: list[dict]) -> None:
        # predict_answers needs equally many candidates per call; NA-dropped questions have fewer
        by_count: dict[int, list[int]] = {}
        for index, choices in enumerate(samples["choices"]):
            by_count.setdefault(len(choices), []).append(index)
        for indices in by_count.values():
            group = subset_samples(samples, indices)
            candidates = [[format_choice(letter, choice) for letter, choice in zip(letters, choices)]
                          for letters, choices in zip(group["choice_letters"], group["choices"])]
            ranking = model.predict_answers(group, candidates)
            for position, index in enumerate(indices):
                best = int(ranking.scores[position].argmax())
                letter = group["choice_letters"][position][best]
                rows[index].update(answer_choice=group["answer_choice"][position], prediction=candidates[position][best],
                                   predicted_choice=letter, correct=letter == group["answer_choice"][position],
                                   scores=[round(float(v), 6) for v in ranking.scores[position]])

    def _score_generated_letter(self, model: torch.nn.Module, samples: dict[str, Any], rows: list[dict]) -> None:
        for row, text, answer_choice in zip(rows, self._generate(model, samples), samples["answer_choice"]):
            first_letter = _LETTER_IN_TEXT.search(text)
            row.update(answer_choice=answer_choice, prediction=text, correct=f"{answer_choice}." in text,
                       predicted_choice=first_letter.group(1) if first_letter else None)

    def _score_open(self, model: torch.nn.Module, samples: dict[str, Any], rows: list[dict]) -> None:
        for row, text in zip(rows, self._generate(model, samples)):
            row.update(prediction=text, correct=overlap_tokens(text) == overlap_tokens(row["answer"]),
                       bleu_1=round(bleu_1(text, row["answer"]), 6), rouge_1=round(rouge_1(text, row["answer"]), 6))

    # ---- per split --------------------------------------------------------------------------------
    def after_evaluation(self, val_result: list[dict], split_name: str, epoch: Any, **kwargs: Any) -> dict | None:
        merged, result_file = self.gather_results(val_result, split_name, epoch)
        if merged is None:
            return None
        metrics = self.vqa_metrics(merged)
        metrics.update(**self.eval_skip_counts(split_name), predictions_file=result_file)
        self.write_metrics(metrics, split_name, epoch)
        logger.info("%s (%s): %s", split_name, metrics["method"],
                    {key: metrics[key] for key in ("num_samples", "accuracy", "bleu_1", "rouge_1") if key in metrics})
        return metrics

    def vqa_metrics(self, rows: Sequence[dict]) -> dict[str, Any]:
        """Overall and per-question-type scores of merged per-sample rows."""
        types = [row["question_type"] for row in rows]
        correct = [float(row["correct"]) for row in rows]
        mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
        metrics: dict[str, Any] = {"mode": self.mode, "method": self.method if self.mode == "closed" else "generate",
                                   "num_samples": len(rows)}
        if self.mode == "closed":
            metrics.update(accuracy=mean(correct), per_type={
                name: {"accuracy": summary["mean"], "num_samples": summary["num_samples"]}
                for name, summary in per_type_summary(correct, types).items()})
            metrics["agg_metrics"] = metrics["accuracy"]
        else:
            bleu, rouge = [row["bleu_1"] for row in rows], [row["rouge_1"] for row in rows]
            metrics.update(bleu_1=mean(bleu), rouge_1=mean(rouge), exact_match=mean(correct), per_type={
                name: {"bleu_1": bleu_summary["mean"], "rouge_1": rouge_summary["mean"],
                       "num_samples": bleu_summary["num_samples"]}
                for (name, bleu_summary), rouge_summary in zip(per_type_summary(bleu, types).items(),
                                                               per_type_summary(rouge, types).values())})
            metrics["agg_metrics"] = metrics["rouge_1"]
        return metrics
