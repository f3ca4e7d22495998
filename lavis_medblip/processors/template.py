"""Affine registration to the vendored ICBM 2009c template, which is prepared as the subjects are."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from lavis_medblip.assets import ICBM_BRAIN_MASK, ICBM_T1
from lavis_medblip.processors.readers import load_volume
from lavis_medblip.processors.transforms import (
    Compose, CorrectBiasField, EnsureVolume3D, HeadQuantileNormalize, ResampleToFieldOfView, ScaleIntensityPercentiles,
    ToCanonicalRAS, head_centre_mm, quantiles_within,
)
from lavis_medblip.processors.threads import one_thread
from lavis_medblip.processors.volume_types import TemplateAlignment, Volume


@dataclass(frozen=True)
class TemplateReference:
    """The ICBM 2009c template on a processor's grid: what :class:`RegisterToTemplate` aligns to."""

    head: torch.Tensor  # 1 x S^3, head quantiles (the registration target)
    brain_mask: torch.Tensor  # 1 x S^3 bool, the template's brain mask dilated by one voxel
    brain: torch.Tensor  # 1 x S^3, quantiles within brain_mask (the reference of template deviations)
    affine: np.ndarray


@functools.lru_cache(maxsize=4)
def template_reference(size: int, field_of_view_mm: float, bias_field_sigma_mm: Optional[float]) -> TemplateReference:
    """The vendored ICBM 2009c T1 and brain mask on a ``size``^3 grid, preprocessed as the subjects are.

    Built once per process and setting (a few seconds).
    """
    t1 = Compose([EnsureVolume3D(), ToCanonicalRAS(), ScaleIntensityPercentiles()])(load_volume(ICBM_T1))
    mask = Compose([EnsureVolume3D(), ToCanonicalRAS()])(load_volume(ICBM_BRAIN_MASK))
    resample = ResampleToFieldOfView(size, field_of_view_mm)
    centre = head_centre_mm(t1)
    head = resample.resample(t1, centre)
    if bias_field_sigma_mm is not None:
        head = CorrectBiasField(bias_field_sigma_mm)(head)
    head = HeadQuantileNormalize()(head)
    mask_cube = resample.resample(replace(mask, data=np.asarray(mask.data, dtype=np.float32)), centre).data > 0.5
    brain_mask = torch.from_numpy(ndimage.binary_dilation(mask_cube[0].numpy(), iterations=1))[None]
    return TemplateReference(head=head.data.float(), brain_mask=brain_mask,
                             brain=quantiles_within(head.data.float(), brain_mask), affine=head.affine)


class RegisterToTemplate:
    """Align the head affinely to the ICBM 2009c template, keep the brain, re-rank its intensities.

    Centring on the head's centre of mass (:class:`ResampleToFieldOfView`) leaves heads a few mm
    apart, more between sites, because fields of view cover different amounts of neck and face,
    and heads differ in size and pose. This fits 12 affine parameters (Adam on the mean squared
    difference to the template within its brain, both as head quantiles; deterministic on CPU),
    resamples the cube into template space, zeroes everything outside the template's brain mask
    (skull, scalp and neck, which sites crop differently) and maps the brain voxels to their
    intensity quantiles. Expects the output of :class:`HeadQuantileNormalize` on a
    :class:`ResampleToFieldOfView` grid of the same ``size`` and ``field_of_view_mm``, after
    :class:`CorrectBiasField` with ``bias_field_sigma_mm`` if that is set; the template is
    prepared the same way. The fit runs on a grid of about ``FIT_SPACING_MM`` voxels, so its
    cost does not grow with ``size``.
    """

    FIT_SPACING_MM = 8.0

    def __init__(self, size: int, field_of_view_mm: float, bias_field_sigma_mm: Optional[float] = None,
                 iterations: int = 60, learning_rate: float = 0.01) -> None:
        self.size = int(size)
        self.field_of_view_mm = float(field_of_view_mm)
        self.bias_field_sigma_mm = None if bias_field_sigma_mm is None else float(bias_field_sigma_mm)
        self.iterations = int(iterations)
        self.learning_rate = float(learning_rate)

    def reference(self) -> TemplateReference:
        return template_reference(self.size, self.field_of_view_mm, self.bias_field_sigma_mm)

    def __call__(self, volume: Volume) -> Volume:
        reference = self.reference()
        moving = volume.data.float()[None]
        theta = self.fit(moving, reference.head[None], reference.brain_mask[None].float())
        with torch.no_grad():
            grid = F.affine_grid(theta, list(moving.shape), align_corners=False)
            aligned = F.grid_sample(moving, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        alignment = TemplateAlignment(theta=theta[0].double().numpy(), subject_affine=np.asarray(volume.affine).copy())
        return replace(volume, data=quantiles_within(aligned, reference.brain_mask), affine=reference.affine.copy(),
                       template_alignment=alignment)

    def fit(self, moving: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The affine (1, 3, 4) in ``affine_grid``'s normalised coordinates that maps ``fixed`` onto ``moving``.

        The squared differences count where ``weight`` (the brain) is, after a blur of one fit
        voxel, so the brain's edge counts and the neck and face, which sites crop, do not.
        """
        factor = max(1, round(self.FIT_SPACING_MM * self.size / self.field_of_view_mm))
        moving, fixed = F.avg_pool3d(moving, factor, ceil_mode=True), F.avg_pool3d(fixed, factor, ceil_mode=True)
        weight = F.avg_pool3d(F.avg_pool3d(weight, factor, ceil_mode=True), 3, stride=1, padding=1) > 0
        theta = torch.eye(3, 4)[None].requires_grad_(True)
        optimizer = torch.optim.Adam([theta], lr=self.learning_rate)
        with torch.enable_grad(), one_thread():  # 60 steps would carry a thread-dependent rounding into the affine
            for _ in range(self.iterations):
                grid = F.affine_grid(theta, list(moving.shape), align_corners=False)
                loss = (F.grid_sample(moving, grid, align_corners=False) - fixed)[weight].pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return theta.detach()
