"""Relevance maps: where in the volume MedBLIP's answer comes from, one non-negative map per sample, shaped
like the model's input (B, S, S, S) and deterministic for a given model and input (no sampling, no dropout).

Two methods, chosen by name (:data:`METHODS`):

* ``gradient``: gradient x input of the chosen answer's length-normalised log-likelihood, the score
  :meth:`MedBLIP.predict_answers` ranks by (:meth:`MedBLIP.score_candidates`, the same code), kept where
  positive: a voxel is relevant when setting it to 0 (the background; with ``template_deviation_scale``, the
  template's intensity) would lower the answer's score, to first order. Voxel-sharp; costs one backward pass.
* ``attention``: the Q-Former's cross-attention from its queries to the visual tokens (mean over heads,
  queries and cross-attention layers), rolled out through the ViT blocks' self-attention (``0.5 A + 0.5 I``
  per block, Abnar & Zuidema 2020) onto the 3D patch tokens, dropping the CLS token, and interpolated
  trilinearly from the patch centres to the voxels (zero where no patch reaches). Answer-independent: it
  shows what the queries read, not which answer that supports; costs one forward pass of the vision path.

Both bypass a ``vision_feature_cache``: cached tokens carry no gradient and no attention.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.nn import functional as F

from lavis_medblip.annotations.schema import CLASS_ANSWERS

METHODS = ("gradient", "attention")


def explain(model: Any, samples: Mapping[str, Any], answer: str | Sequence[str] | None = None,
            method: str = "gradient", candidates: Sequence[str] | None = None) -> torch.Tensor:
    """Relevance maps (B, S, S, S), float32, non-negative, on the model input's device.

    Args:
        model: a :class:`~lavis_medblip.models.medblip.MedBLIP` whose prompt holds the image.
        samples: as for ``predict_answers``: ``image`` (B, 1, S, S, S), ``text_input``, optional ``question``.
        answer: the answer to explain, one for the batch or one per sample; ``None``: each sample's
            predicted answer among ``candidates`` (calibrated, as ``predict_answers`` predicts).
        method: one of :data:`METHODS`.
        candidates: the answers ``answer=None`` chooses from (default: the three class answers).
    """
    if method not in METHODS:
        raise ValueError(f"unknown relevance method {method!r}; choose from {list(METHODS)}")
    if not model.config.uses_image:
        raise ValueError(f"this model's prompt has no image (prompt_order {list(model.config.prompt_order)}): its "
                         "answers do not depend on the volume, so it has no relevance map")
    image = samples["image"]
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"samples['image'] must be (B, 1, S, S, S), got {tuple(image.shape)}")
    with live_vision_path(model):
        if method == "gradient":
            maps = gradient_x_input(model, samples, answer, list(candidates or CLASS_ANSWERS.values()))
        else:
            maps = attention_rollout(model, image)
    return maps.detach().float().clamp_(min=0.0)


@contextlib.contextmanager
def live_vision_path(model: Any) -> Iterator[None]:
    """The model without its vision feature cache, in eval mode (no dropout), for the block; restored after."""
    cache, training = model.feature_cache, model.training
    model.feature_cache = None
    model.eval()
    try:
        yield
    finally:
        model.feature_cache = cache
        model.train(training)


def _per_sample(answer: str | Sequence[str], batch_size: int) -> list[str]:
    answers = [answer] * batch_size if isinstance(answer, str) else list(answer)
    if len(answers) != batch_size:
        raise ValueError(f"{len(answers)} answers for {batch_size} samples")
    return answers


def gradient_x_input(model: Any, samples: Mapping[str, Any], answer: str | Sequence[str] | None,
                     candidates: Sequence[str]) -> torch.Tensor:
    """Positive part of d(score of the answer)/d(input) x input, (B, S, S, S); see the module docstring.

    The samples' scores are summed before the backward pass: each depends on its own volume only.
    """
    image = samples["image"].detach().clone().requires_grad_(True)
    live = {**samples, "image": image}
    batch_size = image.shape[0]
    with torch.enable_grad():
        if answer is None:  # score every candidate, explain the one predict_answers would predict
            scores, per_sample = model.score_candidates(live, list(candidates))
            chosen = model.calibration.logits(scores.detach(), per_sample).argmax(dim=1)
            target = scores.gather(1, chosen[:, None]).sum()
        else:
            scores, _ = model.score_candidates(live, [[text] for text in _per_sample(answer, batch_size)])
            target = scores.sum()
        (gradient,) = torch.autograd.grad(target, image)
    return (gradient * image.detach()).float()[:, 0].clamp(min=0.0)


@torch.no_grad()
def attention_rollout(model: Any, image: torch.Tensor) -> torch.Tensor:
    """Q-Former cross-attention rolled out through the ViT onto the voxels (B, S, S, S); see the module docstring."""
    vit = model.visual_encoder
    block_attention: list[torch.Tensor] = []
    hooks = [block.attn.register_forward_hook(lambda module, args, _: block_attention.append(
        _self_attention(module, args[0]))) for block in vit.blocks]
    try:
        tokens = model.encode_image(image).float()  # (B, N + 1, width), CLS first
    finally:
        for hook in hooks:
            hook.remove()
    queries = model.query_tokens.expand(tokens.shape[0], -1, -1)
    output = model.Qformer.bert(query_embeds=queries, encoder_hidden_states=tokens, output_attentions=True,
                                encoder_attention_mask=torch.ones(tokens.shape[:-1], dtype=torch.long,
                                                                  device=tokens.device), return_dict=True)
    # LAVIS lists a cross-attention for every layer; layers without one hold their key/value cache there
    cross = [maps for maps, layer in zip(output.cross_attentions, model.Qformer.bert.encoder.layer)
             if layer.has_cross_attention]
    token_weights = torch.stack([maps.float().mean(dim=(1, 2)) for maps in cross]).mean(dim=0)  # (B, N + 1)
    rollout = torch.eye(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1, -1)
    for attention in block_attention:  # input tokens -> output tokens, block by block
        mixed = 0.5 * attention + 0.5 * torch.eye(attention.shape[-1], device=attention.device)
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    patch_weights = (token_weights[:, None, :] @ rollout)[:, 0, 1:]  # (B, N): the CLS input token has no place
    stem = vit.patch_embed
    grid = patch_weights.view(-1, stem.grid_size, stem.grid_size, stem.grid_size)
    return patches_to_voxels(grid, stem.image_size, stem.proj.kernel_size[0], stem.proj.stride[0])


def _self_attention(module: Any, x: torch.Tensor) -> torch.Tensor:
    """The head-mean attention probabilities (B, N, N) of an EVA ViT ``Attention`` on its input ``x``."""
    if getattr(module, "relative_position_bias_table", None) is not None:
        raise NotImplementedError("attention rollout of ViT blocks with a relative position bias")
    bias = None if module.q_bias is None else torch.cat(
        (module.q_bias, torch.zeros_like(module.v_bias), module.v_bias))
    qkv = F.linear(x, module.qkv.weight, bias).reshape(x.shape[0], x.shape[1], 3, module.num_heads, -1)
    query, key = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, heads, N, head width)
    return ((query * module.scale) @ key.transpose(-2, -1)).float().softmax(dim=-1).mean(dim=1)


def patches_to_voxels(grid: torch.Tensor, size: int, patch: int, stride: int) -> torch.Tensor:
    """Per-patch values (B, g, g, g) -> voxels (B, S, S, S): trilinear between patch centres, constant to the
    edge of the outermost patches, zero beyond them (voxels no patch covers)."""
    weights = _linear_weights(grid.shape[1], size, patch, stride, grid.device)  # (S, g), the same on each axis
    return torch.einsum("ia,jb,kc,nabc->nijk", weights, weights, weights, grid.float())


def _linear_weights(count: int, size: int, patch: int, stride: int, device: torch.device) -> torch.Tensor:
    voxel = torch.arange(size, dtype=torch.float64, device=device)
    position = ((voxel - (patch - 1) / 2.0) / stride).clamp(0.0, count - 1)  # in patch-index units
    lower = position.floor().long().clamp(max=count - 1)
    upper = (lower + 1).clamp(max=count - 1)
    fraction = position - lower
    weights = torch.zeros(size, count, dtype=torch.float64, device=device)
    weights[voxel.long(), lower] += 1.0 - fraction
    weights[voxel.long(), upper] += fraction
    weights[voxel >= (count - 1) * stride + patch] = 0.0  # beyond the last patch
    return weights.float()
