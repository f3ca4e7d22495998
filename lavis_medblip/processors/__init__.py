"""Registered LAVIS processors: 3D MRI volumes and EHR text.
Importing this package registers ``mri_volume_train``, ``mri_volume_eval``, ``mri_volume_blank``, ``medblip_text``
and ``medblip_text_blank`` in ``lavis.common.registry``.
"""
import lavis  # noqa: F401  (first, before our modules: see lavis_medblip/registration.py)
from lavis_medblip.processors.blank import MedBlipTextBlankProcessor, MriVolumeBlankProcessor
from lavis_medblip.processors.text import MedBlipTextProcessor
from lavis_medblip.processors.readers import load_volume
from lavis_medblip.processors.volume_types import (
    ConstantVolumeWarning,
    DegenerateVolumeWarning,
    NonFiniteVolumeWarning,
    Volume,
    VolumeLimits,
    VolumeReadError,
    VolumeTransformError,
)
from lavis_medblip.processors.volume import MriVolumeEvalProcessor, MriVolumeProcessor, MriVolumeTrainProcessor
from lavis_medblip.processors.volume_cache import VolumeCache

__all__ = [
    "ConstantVolumeWarning",
    "DegenerateVolumeWarning",
    "MedBlipTextBlankProcessor",
    "MedBlipTextProcessor",
    "MriVolumeBlankProcessor",
    "MriVolumeEvalProcessor",
    "MriVolumeProcessor",
    "MriVolumeTrainProcessor",
    "NonFiniteVolumeWarning",
    "Volume",
    "VolumeCache",
    "VolumeLimits",
    "VolumeReadError",
    "VolumeTransformError",
    "load_volume",
]
