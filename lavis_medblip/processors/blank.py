"""Blank inputs for the one-modality baselines: ``mri_volume_blank`` (a zero volume in place of the scan, text
only) and ``medblip_text_blank`` (no EHR text, image only).
"""
from __future__ import annotations

from typing import Any

import torch

from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor


@registry.register_processor("mri_volume_blank")
class MriVolumeBlankProcessor(BaseProcessor):
    """A zero ``1 x S x S x S`` volume, whatever the item: the paper's Table 2 compares MedBLIP with its
    LM reading the text alone. Swapping a dataset's ``vis_processor`` for this one trains and evaluates
    exactly the same model and pipeline with the image information removed (the file is not even read).
    """

    def __init__(self, image_size: int = 224):
        super().__init__()
        self.image_size = int(image_size)

    def __call__(self, item: Any) -> torch.Tensor:
        return torch.zeros(1, self.image_size, self.image_size, self.image_size)

    @classmethod
    def from_config(cls, cfg: Any = None) -> "MriVolumeBlankProcessor":
        return cls(image_size=(cfg or {}).get("image_size", 224))


@registry.register_processor("medblip_text_blank")
class MedBlipTextBlankProcessor(BaseProcessor):
    """An empty EHR text, whatever the record says: the image-only baseline. Swapping a dataset's
    ``text_processor`` for this one trains and evaluates the same model and pipeline without the text."""

    def __call__(self, text: Any) -> str:
        return ""

    @classmethod
    def from_config(cls, cfg: Any = None) -> "MedBlipTextBlankProcessor":
        return cls()
