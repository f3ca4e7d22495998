"""The class-independent anatomy: how one population's healthy brains vary around the template (head size,
structure sizes, asymmetry, smooth warps, torque), drawn per subject before the atrophy (sources: the package
docstring)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dataset_builders.simulate_cohort.fields import capped_rates


@dataclass(frozen=True)
class AnatomyFamily:
    """How one population's healthy anatomy varies around the template; no parameter depends on class.

    Natural sizes are structure-basis rates (as in ``ATROPHY_RATES``: + shrinks the MTL and the cortex,
    + enlarges the ventricles), shared left/right plus an asymmetry (right = common + a, left = common - a).
    """

    name: str
    head_scale_sd: float  # linear scale sd (one scale, or one per axis if head_scale_anisotropic)
    head_scale_anisotropic: bool
    head_scale_sex_offset: float  # + for males, - for females
    ventricle_rate: tuple[float, float]  # (mean, sd)
    ventricle_asymmetry_sd: float
    mtl_rate_sd: float
    mtl_asymmetry_sd: float
    cortex_rate_sd: float
    warp_rms_mm: float  # smooth random displacement field
    warp_length_mm: float  # its Gaussian smoothing sigma
    torque_mm: tuple[float, float]  # (mean, sd) of t in u_x = t tanh((y - y_c) / torque_length_mm)
    torque_length_mm: float


TRAINING_ANATOMY = AnatomyFamily(
    "training", head_scale_sd=0.035, head_scale_anisotropic=False, head_scale_sex_offset=0.02,
    ventricle_rate=(0.3, 0.45), ventricle_asymmetry_sd=0.12, mtl_rate_sd=0.08, mtl_asymmetry_sd=0.04,
    cortex_rate_sd=0.012, warp_rms_mm=3.0, warp_length_mm=25.0, torque_mm=(1.5, 1.0), torque_length_mm=40.0)
#: A family training never sees: larger, smoother warps, a head that is not just scaled, mirrored torque.
HELD_OUT_ANATOMY = replace(TRAINING_ANATOMY, name="held_out", head_scale_sd=0.04, head_scale_anisotropic=True,
                           warp_rms_mm=4.0, warp_length_mm=45.0, torque_mm=(-1.5, 1.0))
ANATOMY_FAMILIES = {family.name: family for family in (TRAINING_ANATOMY, HELD_OUT_ANATOMY)}


def draw_anatomy(rng: np.random.Generator, family: AnatomyFamily, sex: str) -> dict[str, Any]:
    """The class-independent draws of one subject's healthy anatomy (the warp field is drawn after)."""
    offset = family.head_scale_sex_offset if sex == "M" else -family.head_scale_sex_offset
    scale = 1.0 + offset + rng.normal(0.0, family.head_scale_sd, 3 if family.head_scale_anisotropic else 1)
    ventricle_mean, ventricle_sd = family.ventricle_rate
    common = {"ventricles": rng.normal(ventricle_mean, ventricle_sd), "mtl": rng.normal(0.0, family.mtl_rate_sd),
              "cortex": rng.normal(0.0, family.cortex_rate_sd)}
    asymmetry = {"ventricles": rng.normal(0.0, family.ventricle_asymmetry_sd),
                 "mtl": rng.normal(0.0, family.mtl_asymmetry_sd)}
    return {"family": family.name, "head_scale": [float(v) for v in np.broadcast_to(scale, 3)],
            "rates": capped_rates(common, asymmetry), "torque_mm": float(rng.normal(*family.torque_mm))}
