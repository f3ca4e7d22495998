"""MedBLIP's loss terms, and what a pretraining row without a diagnosis contributes to them.

OASIS-1 rows (paper §4: "no diagnoses ... we use all images from OASIS 1 for pre-training") have an
image and an EHR text but no answer. ``model.loss.unlabelled_rows`` says what they train:

* ``itc_text_only`` (default): only ITC(image, EHR text). They are neither anchors nor negatives of
  ITC(image, Q&A), and the LM term ignores them, so those two terms get no gradient from them.
* ``empty_answer``: every row counts in every term with an empty answer, as this project did before
  the key existed (the LM learns to stop right after "Answer:", and under ITC(image, Q&A) the unlabelled
  rows share one text and are false negatives of each other).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from lavis.common.dist_utils import get_rank
from lavis.models.base_model import concat_all_gather

from lavis_medblip.models.config import UNLABELLED_ROWS

#: BLIP-2's label smoothing of the ITC cross-entropy
ITC_LABEL_SMOOTHING = 0.1


def labelled_rows(answers: Sequence[str], policy: str, device: torch.device) -> torch.Tensor | None:
    """Which rows have an answer (B,) bool, or ``None`` when every row counts in every term.

    A row is unlabelled when its answer is empty: the datasets yield ``""`` for a record without a
    diagnosis (``label`` -1). Under ``empty_answer`` every row counts.
    """
    if policy not in UNLABELLED_ROWS:
        raise ValueError(f"model.loss.unlabelled_rows must be one of {list(UNLABELLED_ROWS)} (got {policy!r})")
    mask = torch.tensor([bool(answer.strip()) for answer in answers], dtype=torch.bool, device=device)
    return None if policy == "empty_answer" or bool(mask.all()) else mask


def _smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                            columns: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(..., label_smoothing)`` over the ``rows`` anchors and the ``columns`` candidates only.

    A left-out row or column gets exactly zero gradient (it is indexed away or masked to -inf); with no
    row left the loss is 0, still part of the graph (distributed training then all-reduces zeros).
    """
    chosen, chosen_targets = logits[rows], targets[rows]
    log_probs = chosen.masked_fill(~columns, float("-inf")).log_softmax(dim=-1)
    nll = -log_probs.gather(1, chosen_targets[:, None]).squeeze(1)
    smooth = -log_probs.masked_fill(~columns, 0.0).sum(dim=-1) / columns.sum().clamp(min=1)
    per_row = (1 - ITC_LABEL_SMOOTHING) * nll + ITC_LABEL_SMOOTHING * smooth
    return (per_row.sum() + chosen.sum() * 0.0) / max(int(rows.sum()), 1)


def image_text_contrastive_loss(image_feats: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor,
                                rows: torch.Tensor | None = None) -> torch.Tensor:
    """BLIP-2's ITC: each text is matched by its most similar query; negatives come from all ranks.

    ``image_feats`` (B, queries, D) and ``text_feat`` (B, D) are L2-normalised. Gathered features
    carry no gradient (as in BLIP-2); the loss equals the single-process loss on the global batch.
    ``rows`` (B,) bool, if given, keeps only those pairs, as anchors and as negatives (on every rank).
    """
    image_feats_all = concat_all_gather(image_feats)
    text_feat_all = concat_all_gather(text_feat)
    sim_i2t = torch.einsum("bqd,td->btq", image_feats, text_feat_all).max(-1).values / temp
    sim_t2i = torch.einsum("td,bqd->tbq", text_feat, image_feats_all).max(-1).values / temp
    batch_size = image_feats.shape[0]
    targets = torch.arange(batch_size, device=image_feats.device) + get_rank() * batch_size
    if rows is None:
        return (F.cross_entropy(sim_i2t, targets, label_smoothing=ITC_LABEL_SMOOTHING)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=ITC_LABEL_SMOOTHING)) / 2
    rows_all = concat_all_gather(rows.float()) > 0.5
    return (_smoothed_cross_entropy(sim_i2t, targets, rows, rows_all)
            + _smoothed_cross_entropy(sim_t2i, targets, rows, rows_all)) / 2


def masked_lm_loss(total: torch.Tensor, count: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Mean NLL over the answer tokens of the ``rows`` (all rows when ``None``), from the LM's per-row
    summed log-likelihood ``total`` and token ``count``; 0, still in the graph, when no row is left."""
    if rows is not None:
        total, count = total[rows], count[rows]
    return -total.sum() / count.sum().clamp(min=1)
