"""The scanner sites: each one's grid, orientation, data type, contrast, bias field and noise; one is held out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import nibabel as nib
import numpy as np

from dataset_builders.simulate_cohort.fields import BRAIN_CENTER_MM


@dataclass(frozen=True)
class Site:
    """One scanner/protocol. ``voxel_scale`` multiplies the cohort's base ``voxel_mm``."""

    name: str
    voxel_scale: tuple[float, float, float]
    orientation: str  # nibabel axis codes of the stored array, e.g. "LPS"
    fov_mm: tuple[float, float, float]  # R-L, A-P, S-I extent
    center_shift_mm: tuple[float, float, float]
    dtype: str  # stored data type
    intensity_max: float  # value of the brightest template tissue
    gamma: float  # contrast: intensity ** gamma
    bias_strength: float  # sd of the log bias field's coefficients
    noise: float  # noise sd as a fraction of intensity_max
    rician: bool
    held_out: bool = False


SITES: tuple[Site, ...] = (
    Site("siteA", (1.0, 1.0, 1.0), "RAS", (176, 212, 176), (0, 0, 0), "int16", 1000.0, 1.0, 0.08, 0.020, False),
    Site("siteB", (1.0, 1.0, 1.25), "LPS", (192, 228, 192), (0, 0, -8), "int16", 4000.0, 0.85, 0.15, 0.030, True),
    Site("siteC", (1.25, 1.0, 1.0), "PIR", (200, 240, 200), (0, -4, -14), "uint8", 220.0, 1.15, 0.12, 0.015, False),
    Site("siteD", (0.9, 0.9, 1.6), "LIA", (168, 200, 160), (0, 4, 8), "float32", 1.0, 1.35, 0.25, 0.045, True,
         held_out=True),
)
TRAINING_SITES = tuple(site for site in SITES if not site.held_out)
HELD_OUT_SITE = next(site for site in SITES if site.held_out)


def site_grid(site: Site, voxel_mm: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    voxel = np.asarray(site.voxel_scale) * voxel_mm
    shape = tuple(int(round(f / v)) for f, v in zip(site.fov_mm, voxel))
    center = np.asarray(BRAIN_CENTER_MM) + np.asarray(site.center_shift_mm)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(voxel)
    affine[:3, 3] = center - (np.asarray(shape) - 1) / 2.0 * voxel
    return affine, shape


def bias_field(rng: np.random.Generator, shape: Sequence[int], strength: float) -> np.ndarray:
    """exp of a random quadratic polynomial over the field of view (smooth, multiplicative)."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = (x, y, z, x * y, x * z, y * z, x * x, y * y, z * z)
    coef = rng.normal(0.0, strength, len(terms)) * np.array([1, 1, 1, .5, .5, .5, .5, .5, .5])
    log_bias = sum(c * t for c, t in zip(coef, terms))
    return np.exp(log_bias - np.mean(log_bias)).astype(np.float32)


def to_site_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return values.astype(np.float32)
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype)


def reorient(array: np.ndarray, affine_ras: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """Store an RAS array in ``codes`` orientation, with the affine that keeps world positions."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.axcodes2ornt(tuple(codes)))
    stored = np.ascontiguousarray(nib.orientations.apply_orientation(array, transform))
    affine = affine_ras @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return stored, affine
