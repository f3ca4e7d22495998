"""The 3D vision path: a trainable 3D stem in front of LAVIS's frozen 2D EVA ViT blocks (paper §3.3),
built, loaded with 2D weights and frozen.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Mapping

import torch
from torch import nn

from lavis.models.eva_vit import VisionTransformer, convert_weights_to_fp16

from lavis_medblip.models.config import VIT_PRESETS, VisionConfig
from lavis_medblip.models.weights import read_state_dict

logger = logging.getLogger(__name__)

EVA_VIT_G_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
#: The 2D stem's weights in a ViT checkpoint: replaced by the 3D stem, so deliberately not loaded.
STEM_2D_KEYS = ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed")


class PatchEmbed3D(nn.Module):
    """Volume (B, C, S, S, S) → patch tokens (B, N, embed_dim) with a learnable Conv3d."""

    def __init__(self, image_size: int, patch_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        if patch_size > image_size:
            raise ValueError(f"patch_size must not exceed image_size (got {patch_size} and {image_size})")
        self.image_size = image_size
        self.grid_size = (image_size - patch_size) // stride + 1
        self.num_patches = self.grid_size**3
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        if volume.dim() != 5:
            raise ValueError(f"expected a volume batch of shape (B, C, D, H, W), got shape {tuple(volume.shape)}")
        if tuple(volume.shape[2:]) != (self.image_size,) * 3:
            raise ValueError(
                f"input volume size {tuple(volume.shape[2:])} doesn't match image_size {self.image_size}; "
                f"use the mri_volume_* processors with image_size={self.image_size}"
            )
        return self.proj(volume).flatten(2).transpose(1, 2)


def build_vision_encoder(vision: VisionConfig, image_size: int) -> VisionTransformer:
    """The vision path of ``model.vision`` for volumes of ``image_size``³: built, weights loaded, blocks cast.

    Which parts train is the model's choice (:func:`freeze_vit_blocks`, ``freeze_vision_stem``).
    """
    vit = build_vit_3d(vision.model, image_size, vision.patch_size, vision.patch_stride, vit_arch=vision.arch,
                       use_grad_checkpoint=vision.grad_checkpoint)
    if vision.weights:
        load_vit_weights(vit, vision.weights)
    if vision.precision == "fp16":
        # LAVIS's converter touches Conv1d/2d/Linear only, so the Conv3d stem stays fp32 for AdamW.
        convert_weights_to_fp16(vit.blocks)
    return vit


def build_vit_3d(
    vit_model: str,
    image_size: int,
    patch_size: int,
    patch_stride: int | None = None,
    in_chans: int = 1,
    vit_arch: Mapping[str, Any] | None = None,
    use_grad_checkpoint: bool = False,
    drop_path_rate: float = 0.0,
) -> VisionTransformer:
    """LAVIS's EVA ViT with a 3D patch embedding and a 3D position embedding (both trainable).

    MedBLIP (§3.3) cuts a volume into 3D sub-volumes, projects each with a learnable linear map
    (a Conv3d whose kernel equals its stride, :class:`PatchEmbed3D`) and adds learnable 3D position
    embeddings; the tokens then run through the frozen blocks of a ViT pre-trained on 2D images. At
    the paper's settings (224³ input, patch 32) that is 7³ = 343 patch tokens + 1 CLS token, each
    1408 wide. We build LAVIS's own ``VisionTransformer`` and swap its 2D ``patch_embed`` /
    ``pos_embed`` for 3D ones, so ``forward_features`` (CLS token, blocks, gradient checkpointing)
    is LAVIS's code, unchanged.

    ``vit_arch`` overrides the preset's ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio`` (tiny
    CPU configurations use it). Weights are loaded separately by :func:`load_vit_weights`.
    """
    if vit_model not in VIT_PRESETS:
        raise ValueError(f"vit_model {vit_model!r} has no 3D stem. Available: {sorted(VIT_PRESETS)}")
    arch = {**VIT_PRESETS[vit_model], **dict(vit_arch or {})}
    vit = VisionTransformer(
        img_size=224,  # only sizes the 2D stem, which is replaced below
        patch_size=14,
        use_mean_pooling=False,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_checkpoint=use_grad_checkpoint,
        **arch,
    )
    stem = PatchEmbed3D(image_size, patch_size, patch_stride or patch_size, in_chans, arch["embed_dim"])
    vit.patch_embed = stem
    vit.pos_embed = nn.Parameter(torch.zeros(1, stem.num_patches + 1, arch["embed_dim"]))
    nn.init.trunc_normal_(vit.pos_embed, std=0.02)
    return vit


def load_vit_weights(vit: VisionTransformer, url_or_path: str) -> None:
    """Load a 2D ViT checkpoint (LAVIS's key layout) into everything but the 3D stem.

    The 2D patch/position weights are skipped on purpose (logged once); any other missing or
    unexpected key is an error.
    """
    state_dict = read_state_dict(url_or_path, key="vision.weights")
    skipped = [key for key in STEM_2D_KEYS if key in state_dict]
    state_dict = {key: value for key, value in state_dict.items() if key not in STEM_2D_KEYS}
    incompatible = vit.load_state_dict(state_dict, strict=False)
    missing = [key for key in incompatible.missing_keys if not key.startswith(("patch_embed.", "pos_embed"))]
    if missing or incompatible.unexpected_keys:
        raise RuntimeError(
            f"ViT checkpoint {url_or_path} does not fit model.vision.model's architecture: "
            f"missing keys {missing[:10]}{'…' if len(missing) > 10 else ''}, "
            f"unexpected keys {incompatible.unexpected_keys[:10]}"
        )
    logger.info("Loaded ViT weights from %s; not loaded on purpose (replaced by the 3D stem): %s", url_or_path, skipped)


def freeze_vit_blocks(vit: VisionTransformer, freeze: bool, train_cls_token: bool = False) -> None:
    """Freeze everything but the 3D stem (patch embedding, position embedding), or train it all.

    ``train_cls_token`` (``model.vision.train_cls_token``) keeps the CLS token trainable with the stem;
    the paper trains only the patch projection and the position embedding (§3.3). ``freeze=False``
    (``model.freeze_vit: false``) trains the blocks and the CLS token too; it is meant for encoders
    without pretrained weights, such as the CPU demo's, and for Table 4's trainable ViT.
    """
    stem = ("patch_embed.", "pos_embed", "cls_token") if train_cls_token else ("patch_embed.", "pos_embed")
    for name, parameter in vit.named_parameters():
        parameter.requires_grad = not freeze or name.startswith(stem)
