"""Registered 3D MRI volume processors, ``mri_volume_eval`` and ``mri_volume_train``: each composes a
reader (``readers.py``) and small transforms (``transforms.py``, ``template.py``, ``augment.py``) into
one ``1 x S x S x S`` tensor per scan (design and speed: README, Design notes).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor
from omegaconf import DictConfig, ListConfig, OmegaConf

from lavis_medblip.processors.readers import DEFAULT_READERS, load_volume
from lavis_medblip.processors.volume_types import Volume, VolumeLimits, VolumeReadError, VolumeReader
from lavis_medblip.processors.augment import build_augmentation
from lavis_medblip.processors.template import RegisterToTemplate
from lavis_medblip.processors.transforms import (
    Compose, CorrectBiasField, EnsureVolume3D, HeadQuantileNormalize, ReplaceNonFinite, ResampleToFieldOfView,
    ResizeLongestSide, ScaleIntensityPercentiles, ToCanonicalRAS,
)
from lavis_medblip.processors.volume_cache import CACHE_STORAGE_DTYPES, VolumeCache, decode

logger = logging.getLogger(__name__)

VolumeInput = Union[str, os.PathLike, np.ndarray, torch.Tensor]

# Bump when a change to the deterministic pipeline changes its output: invalidates caches.
PIPELINE_VERSION = 1

OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INTENSITY_NORMALIZATIONS = ("percentiles", "head_quantiles")


# --------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (for hashing and validation)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _spacing_tuple(value: Any) -> Optional[tuple[float, float, float]]:
    value = _plain(value)
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = [value] * 3
    spacing = tuple(float(v) for v in value)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"voxel_spacing must be null, a positive number or three positive numbers, got {value!r}")
    return spacing


class MriVolumeProcessor(BaseProcessor):
    """Deterministic MRI volume preprocessing shared by the train and eval processors::

        read (NIfTI / MGH / M3D .npy / DICOM series; the header checked against VolumeLimits first)
          -> EnsureVolume3D -> ReplaceNonFinite
          -> ToCanonicalRAS -> ScaleIntensityPercentiles
          -> ResizeLongestSide + CenterPadToCube     (default: the paper's "pad to a cube and scale")
             or ResampleToFieldOfView                (field_of_view_mm: same mm per voxel at every site)
          [-> CorrectBiasField]                      (bias_field_sigma_mm)
          [-> HeadQuantileNormalize]                 (intensity_normalization: head_quantiles)
          [-> RegisterToTemplate]                    (register_to_template: affine to ICBM 2009c, brain only)
          [-> cache] [-> train-time augmentation]
          [-> deviation from the template]           (template_deviation_scale) -> output dtype

    The defaults follow the paper (its ADNI scans were already bias-corrected and registered). The
    optional steps are for raw multi-site scans: they make a structure's size in voxels and its
    intensity comparable across scanners (the CPU demo uses them all).

    ``processor(item)`` takes a path (NIfTI, MGH/MGZ, M3D .npy, DICOM series directory), a
    numpy array or a tensor (3D, or 1 x D x H x W; voxel order taken as RAS) and returns a
    ``1 x S x S x S`` tensor of ``dtype`` in [0, 1] whose axes are (R, A, S) voxel order (with
    ``template_deviation_scale``: the signed, scaled difference from the template). Anything that
    cannot become such a tensor raises :class:`VolumeReadError` naming the file and the problem;
    whether to skip or abort is the dataset's decision.

    Geometry: by default the longest side is resized to ``image_size`` (``voxel_spacing`` sets the
    physical aspect ratio) and centred in a zero cube. ``field_of_view_mm`` instead samples a
    ``field_of_view_mm`` cube around the head at ``field_of_view_mm / image_size`` mm per voxel.
    Intensity: clipped to ``clip_percentiles`` and scaled to [0, 1]; ``bias_field_sigma_mm``
    then divides out a smooth bias field, and ``intensity_normalization="head_quantiles"`` maps
    head voxels to their intensity quantile (see ``transforms.py``). ``register_to_template`` (needs
    both) then aligns the head affinely to the vendored ICBM 2009c template, keeps the brain and
    re-ranks it; ``template_deviation_scale`` (needs that) outputs ``(volume - template) / scale``,
    what differs from the average brain, zero-centred (small networks learn from it far more
    easily than from volumes that all look like the same brain; see README, limitations).

    ``cache_dir`` turns on the preprocessed-volume cache; ``cache_dtype`` (float16, uint8 or
    float32) is how entries are stored. When it equals ``dtype`` the output maps the entry with no
    decode pass; float32 entries take twice float16's disk and page cache.

    ``limits`` (:class:`VolumeLimits`; YAML keys ``max_voxels``, ``max_bytes``, ``min_axis_size``,
    ``non_finite_warning_fraction``) bound what a file's header may claim before anything is read,
    reject volumes too small along an axis, and set when NaN/Inf voxels give a warning.
    """

    def __init__(
        self,
        image_size: int = 224,
        clip_percentiles: Sequence[float] = (0.5, 99.5),
        voxel_spacing: Optional[Union[float, Sequence[float]]] = None,
        field_of_view_mm: Optional[float] = None,
        bias_field_sigma_mm: Optional[float] = None,
        intensity_normalization: str = "percentiles",
        register_to_template: bool = False,
        template_deviation_scale: Optional[float] = None,
        dtype: str = "float32",
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        cache_dtype: str = "float16",
        readers: Sequence[VolumeReader] = DEFAULT_READERS,
        limits: VolumeLimits = VolumeLimits(),
    ) -> None:
        super().__init__()
        if int(image_size) < 2:
            raise ValueError(f"image_size must be >= 2, got {image_size}")
        if str(dtype) not in OUTPUT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(OUTPUT_DTYPES)}, got {dtype!r}")
        if cache_dtype not in CACHE_STORAGE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(CACHE_STORAGE_DTYPES)}, got {cache_dtype!r}")
        if intensity_normalization not in INTENSITY_NORMALIZATIONS:
            raise ValueError(
                f"intensity_normalization must be one of {list(INTENSITY_NORMALIZATIONS)}, got {intensity_normalization!r}"
            )
        if not isinstance(register_to_template, bool):  # the string "false" would be truthy
            raise TypeError(f"register_to_template must be true or false, got {register_to_template!r}")
        if field_of_view_mm is not None and voxel_spacing is not None:
            raise ValueError("set voxel_spacing (resize the longest side) or field_of_view_mm (fixed mm cube), not both")
        if register_to_template and (field_of_view_mm is None or intensity_normalization != "head_quantiles"):
            raise ValueError("register_to_template needs field_of_view_mm and intensity_normalization: head_quantiles")
        if template_deviation_scale is not None and (not register_to_template or float(template_deviation_scale) <= 0):
            raise ValueError("template_deviation_scale must be positive and needs register_to_template: true, "
                             f"got {template_deviation_scale!r}")
        lower, upper = (float(v) for v in _plain(clip_percentiles))
        self.image_size = int(image_size)
        self.clip_percentiles = (lower, upper)
        self.voxel_spacing = _spacing_tuple(voxel_spacing)
        self.field_of_view_mm = None if field_of_view_mm is None else float(field_of_view_mm)
        self.bias_field_sigma_mm = None if bias_field_sigma_mm is None else float(bias_field_sigma_mm)
        self.intensity_normalization = str(intensity_normalization)
        self.register_to_template = register_to_template
        self.template_deviation_scale = None if template_deviation_scale is None else float(template_deviation_scale)
        self.dtype = OUTPUT_DTYPES[str(dtype)]
        self.limits = limits
        # Readers that follow the interface only (verify_suffix, read) are used as they are.
        self.readers = tuple(reader.with_limits(limits) if isinstance(reader, VolumeReader) else reader
                             for reader in readers)
        steps = [
            EnsureVolume3D(limits.min_axis_size),
            ReplaceNonFinite(limits.non_finite_warning_fraction),
            ToCanonicalRAS(),
            ScaleIntensityPercentiles(lower, upper),
        ]
        if self.field_of_view_mm is None:
            # Fused with the centre padding of CenterPadToCube (one fewer 1 x S^3 copy).
            steps.append(ResizeLongestSide(self.image_size, self.voxel_spacing, pad_to_cube=True))
        else:
            steps.append(ResampleToFieldOfView(self.image_size, self.field_of_view_mm))
        if self.bias_field_sigma_mm is not None:
            steps.append(CorrectBiasField(self.bias_field_sigma_mm))
        if self.intensity_normalization == "head_quantiles":
            steps.append(HeadQuantileNormalize())
        if self.register_to_template:
            self.registration = RegisterToTemplate(self.image_size, self.field_of_view_mm, self.bias_field_sigma_mm)
            steps.append(self.registration)
        self.transform = Compose(steps)
        self.cache = None
        if cache_dir is not None:
            self.cache = VolumeCache(cache_dir, self.cache_settings(), storage_dtype=cache_dtype)

    def cache_settings(self) -> dict[str, Any]:
        """Everything that changes the deterministic output (augmentation and dtype do not).

        The output includes the warnings a hit emits again (``non_finite_warning_fraction``) and
        which volumes are admitted at all: a hit skips every check, so a processor with a larger
        ``min_axis_size`` must not be served what a laxer one admitted. ``max_voxels``/``max_bytes``
        are left out: they guard the memory of reading a file, which a hit does not do, and raising
        them for one large scan must not invalidate a cohort's cache.
        """
        return {
            "pipeline_version": PIPELINE_VERSION,
            "image_size": self.image_size,
            "clip_percentiles": list(self.clip_percentiles),
            "voxel_spacing": None if self.voxel_spacing is None else list(self.voxel_spacing),
            "field_of_view_mm": self.field_of_view_mm,
            "bias_field_sigma_mm": self.bias_field_sigma_mm,
            "intensity_normalization": self.intensity_normalization,
            "register_to_template": self.register_to_template,
            "min_axis_size": self.limits.min_axis_size,
            "non_finite_warning_fraction": self.limits.non_finite_warning_fraction,
        }

    def read(self, item: VolumeInput) -> Volume:
        """Wrap an in-memory array or read a file into a :class:`Volume`."""
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu()
            item = (item.float() if item.dtype == torch.bfloat16 else item).numpy()  # numpy has no bfloat16
        if isinstance(item, np.ndarray):
            return Volume(
                data=item,
                affine=np.eye(4),
                source=f"<array shape={item.shape} dtype={item.dtype}>",
                channel_first=True,
            )
        if isinstance(item, (str, os.PathLike)):
            return load_volume(item, self.readers)
        raise TypeError(f"expected a path, numpy array or tensor, got {type(item).__name__}")

    def preprocess(self, item: VolumeInput, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Deterministic part: 1 x S x S x S in [0, 1]; served from the cache when enabled.

        ``DegenerateVolumeWarning`` warnings are emitted on a cache hit as on a miss.
        """
        build = lambda: self.transform(self.read(item))  # noqa: E731
        if self.cache is None or not isinstance(item, (str, os.PathLike)):
            return build().data.to(dtype)
        if not os.path.exists(item):
            raise VolumeReadError(item, "no such file or directory")
        return decode(self.cache.get_or_build(item, build), dtype)

    def augment(self, volume: torch.Tensor) -> torch.Tensor:
        """Identity here; the train processor overrides it."""
        return volume

    def deviation(self, volume: torch.Tensor) -> torch.Tensor:
        """``(volume - template) / template_deviation_scale``, or ``volume`` when that is unset."""
        if self.template_deviation_scale is None:
            return volume
        reference = self.registration.reference().brain
        return ((volume.float() - reference) / self.template_deviation_scale).to(volume.dtype)

    def __call__(self, item: VolumeInput) -> torch.Tensor:
        return self.deviation(self.preprocess(item, self.dtype))

    @classmethod
    def _kwargs_from_config(cls, cfg: Optional[Mapping[str, Any]]) -> dict[str, Any]:
        cfg = OmegaConf.create() if cfg is None else cfg
        return {
            "image_size": cfg.get("image_size", 224),
            "clip_percentiles": cfg.get("clip_percentiles", [0.5, 99.5]),
            "voxel_spacing": cfg.get("voxel_spacing", None),
            "field_of_view_mm": cfg.get("field_of_view_mm", None),
            "bias_field_sigma_mm": cfg.get("bias_field_sigma_mm", None),
            "intensity_normalization": cfg.get("intensity_normalization", "percentiles"),
            "register_to_template": cfg.get("register_to_template", False),
            "template_deviation_scale": cfg.get("template_deviation_scale", None),
            "dtype": cfg.get("dtype", "float32"),
            "cache_dir": cfg.get("cache_dir", None),
            "cache_dtype": cfg.get("cache_dtype", "float16"),
            "limits": VolumeLimits.from_config(cfg),
        }

    @classmethod
    def from_config(cls, cfg: Optional[Mapping[str, Any]] = None) -> "MriVolumeProcessor":
        return cls(**cls._kwargs_from_config(cfg))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, clip_percentiles={list(self.clip_percentiles)}, "
            f"voxel_spacing={self.voxel_spacing}, field_of_view_mm={self.field_of_view_mm}, "
            f"bias_field_sigma_mm={self.bias_field_sigma_mm}, intensity_normalization={self.intensity_normalization!r}, "
            f"register_to_template={self.register_to_template}, template_deviation_scale={self.template_deviation_scale}, "
            f"dtype={self.dtype}, cache_dir="
            f"{None if self.cache is None else str(self.cache.cache_dir)}, limits={self.limits})"
        )


@registry.register_processor("mri_volume_eval")
class MriVolumeEvalProcessor(MriVolumeProcessor):
    """Eval/inference: deterministic preprocessing only."""


@registry.register_processor("mri_volume_train")
class MriVolumeTrainProcessor(MriVolumeProcessor):
    """Train: deterministic preprocessing (cacheable), then random augmentation.

    ``augment`` maps the keys of :data:`~lavis_medblip.processors.augment.DEFAULT_AUGMENT` to values (missing keys keep their
    defaults); ``None``/``False`` turns augmentation off.
    """

    def __init__(self, *args: Any, augment: Union[Mapping[str, Any], bool, None] = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        augment = _plain(augment)
        if augment is True:
            augment = {}
        self.augmentations = [] if augment in (None, False) else build_augmentation(augment)

    def augment(self, volume: torch.Tensor) -> torch.Tensor:
        for transform in self.augmentations:
            volume = transform(volume)
        return volume

    def __call__(self, item: VolumeInput) -> torch.Tensor:
        if not self.augmentations:
            return self.deviation(self.preprocess(item, self.dtype))
        # Augment in float32 (float16 pow/exp on CPU is slow and coarse), cast at the end.
        return self.deviation(self.augment(self.preprocess(item, torch.float32))).to(self.dtype)

    @classmethod
    def from_config(cls, cfg: Optional[Mapping[str, Any]] = None) -> "MriVolumeTrainProcessor":
        kwargs = cls._kwargs_from_config(cfg)
        augment = True if cfg is None else cfg.get("augment", True)
        return cls(**kwargs, augment=augment)
