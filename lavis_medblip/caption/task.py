"""``medblip_captioning``: image captioning (ROCO, any ``medical_caption`` set) scored like COCO.

Each evaluated sample's caption comes from the model's ``generate`` (beam search; ``run.num_beams``,
``run.max_len``, ``run.min_len``); the task writes ``<split>_epoch<e>_captions.json`` (instance_id,
reference, caption) and ``<split>_epoch<e>_metrics.json`` under the run's ``result`` folder.

Metrics are pycocoevalcap's scorers (one reference per image): BLEU-1..4, ROUGE-L, CIDEr (the
TF-IDF is computed over the evaluated split, so CIDEr of a single image is always 0), and
METEOR 1.5 when ``java`` is on the PATH (otherwise ``"meteor": "not computed: java not found"``).
``agg_metrics`` = CIDEr + BLEU-4, as in LAVIS's caption task.

**Tokenisation differs from COCO's**: COCO runs the Stanford PTB tokenizer (Java); we lowercase
and keep runs of letters and digits (``[a-z0-9]+``), so punctuation is dropped rather than split
off and "t1-weighted" becomes "t1 weighted". Scores are close to, not identical with, PTB-tokenised ones.
"""
from __future__ import annotations

import logging
import re
import shutil
import threading
from typing import Any, Mapping

import torch

from lavis.common.registry import registry

from lavis_medblip.tasks.base import MedBLIPTask

logger = logging.getLogger(__name__)
_WORD = re.compile(r"[a-z0-9]+")


def tokenize_caption(text: str) -> str:
    """Lowercase words and numbers joined by single spaces (punctuation dropped)."""
    return " ".join(_WORD.findall(text.lower()))


def meteor_score(references: Mapping[str, list[str]], candidates: Mapping[str, list[str]]) -> float | str:
    """METEOR 1.5 (needs Java); a string saying why when it cannot be computed."""
    if shutil.which("java") is None:
        return "not computed: java not found"
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = None
    try:
        scorer = Meteor()
        score, _ = scorer.compute_score(dict(references), dict(candidates))
        return float(score)
    except Exception as error:  # noqa: BLE001  (a JVM problem must not lose the other metrics)
        logger.warning("METEOR failed: %s", error)
        if scorer is not None:  # its __del__ would wait forever on the lock a failed call still holds
            scorer.meteor_p.kill()
            scorer.lock = threading.Lock()
        return f"not computed: {type(error).__name__}: {error}"


def caption_metrics(references: Mapping[Any, str], candidates: Mapping[Any, str], meteor: bool = True) -> dict[str, Any]:
    """BLEU-1..4, ROUGE-L, CIDEr (and METEOR) of one candidate against one reference per key."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(references) != set(candidates):
        raise ValueError("references and candidates must have the same keys")
    if not references:
        return {"num_samples": 0}
    keys = sorted(references, key=str)
    gts = {str(key): [tokenize_caption(references[key])] for key in keys}
    res = {str(key): [tokenize_caption(candidates[key])] for key in keys}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    metrics: dict[str, Any] = {f"bleu_{n}": float(score) for n, score in enumerate(bleu, start=1)}
    metrics.update(rouge_l=float(rouge), cider=float(cider), num_samples=len(keys))
    if meteor:
        metrics["meteor"] = meteor_score(gts, res)
    return metrics


@registry.register_task("medblip_captioning")
class MedBLIPCaptioningTask(MedBLIPTask):
    def __init__(self, num_beams: int = 3, max_len: int = 30, min_len: int = 5, compute_meteor: bool = True):
        super().__init__()
        self.num_beams, self.max_len, self.min_len, self.compute_meteor = num_beams, max_len, min_len, compute_meteor

    @classmethod
    def setup_task(cls, cfg: Any = None, **kwargs: Any) -> "MedBLIPCaptioningTask":
        run_cfg = cfg.run_cfg if cfg is not None else {}
        return cls(num_beams=run_cfg.get("num_beams", 3), max_len=run_cfg.get("max_len", 30),
                   min_len=run_cfg.get("min_len", 5), compute_meteor=run_cfg.get("compute_meteor", True))

    loss_terms = ("loss", "loss_lm")  # what BlipCaption's output holds

    def valid_step(self, model: torch.nn.Module, samples: dict[str, Any]) -> list[dict]:
        captions = model.generate(samples, use_nucleus_sampling=False, num_beams=self.num_beams,
                                  max_length=self.max_len, min_length=self.min_len)
        return [{"instance_id": instance_id, "reference": reference, "caption": caption.strip()}
                for instance_id, reference, caption in zip(samples["instance_id"], samples["caption"], captions)]

    def after_evaluation(self, val_result: list[dict], split_name: str, epoch: Any, **kwargs: Any) -> dict | None:
        rows, result_file = self.gather_results(val_result, split_name, epoch, name="captions")
        if rows is None:
            return None
        metrics = caption_metrics({row["instance_id"]: row["reference"] for row in rows},
                                  {row["instance_id"]: row["caption"] for row in rows}, meteor=self.compute_meteor)
        if not self.compute_meteor:
            metrics["meteor"] = "not computed: run.compute_meteor is false"
        metrics["agg_metrics"] = metrics.get("cider", 0.0) + metrics.get("bleu_4", 0.0)
        metrics.update(**self.eval_skip_counts(split_name), captions_file=result_file,
                       tokenization="lowercase [a-z0-9]+ words (not the PTB tokenizer)")
        self.write_metrics(metrics, split_name, epoch)
        logger.info("%s captioning: %s", split_name,
                    {key: metrics[key] for key in ("num_samples", "bleu_4", "rouge_l", "cider", "meteor") if key in metrics})
        return metrics
