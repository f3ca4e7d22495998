"""One subject: its EHR, atrophy and anatomy drawn from its key, its scan resampled from the template through the
pull-back chain (the package docstring), then "scanned" by its site."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dataset_builders.simulate_cohort.anatomy import ANATOMY_FAMILIES, TRAINING_ANATOMY, draw_anatomy
from dataset_builders.simulate_cohort.disease import draw_atrophy
from dataset_builders.simulate_cohort.ehr import draw_ehr
from dataset_builders.simulate_cohort.fields import (
    BRAIN_CENTER_MM, WARP_GRID_MM, displaced, jacobian_determinant, load_template, rotation_matrix, sample,
    smooth_warp_field, structure_basis, structure_displacement,
)
from dataset_builders.simulate_cohort.sites import SITES, bias_field, reorient, site_grid, to_site_dtype


#: The head's pose in the scanner: sd of its rotation (degrees) and shift (mm) about the brain centre.
HEAD_ROTATION_SD_DEG = 3.0
HEAD_SHIFT_SD_MM = 3.0


@dataclass
class SubjectSpec:
    """Who a subject is; ``key`` seeds all of its random numbers."""

    subject_id: str
    label: str
    site: str
    split: str
    key: tuple[int, int, int]  # (seed, class index, k)
    anatomy_family: str = TRAINING_ANATOMY.name  # a key of ANATOMY_FAMILIES


@dataclass
class SimulatedSubject:
    spec: SubjectSpec
    image: np.ndarray  # stored array (site dtype and orientation)
    affine: np.ndarray
    labels: np.ndarray | None  # warped CerebrA labels in the same grid, or None
    ehr: dict[str, Any]  # as shown (missing fields None)
    truth: dict[str, Any]  # ground truth, volumes, Jacobians


def simulate_subject(spec: SubjectSpec, *, voxel_mm: float = 2.0, ehr_informativeness: float = 0.3,
                     missing_prob: float = 0.4, atrophy_scale: float = 1.0,
                     save_labels: bool = False) -> SimulatedSubject:
    """Generate one subject's volume, EHR and ground truth from ``spec.key`` alone."""
    site = next(s for s in SITES if s.name == spec.site)
    rng = np.random.default_rng(list(spec.key))
    ehr_true, ehr_shown = draw_ehr(rng, spec.label, ehr_informativeness, missing_prob)
    disease = draw_atrophy(rng, spec.label, ehr_true["age"], atrophy_scale)
    family = ANATOMY_FAMILIES[spec.anatomy_family]
    anatomy = draw_anatomy(rng, family, ehr_true["sex"])
    rotation = rotation_matrix(rng.normal(0.0, HEAD_ROTATION_SD_DEG, 3))
    shift = rng.normal(0.0, HEAD_SHIFT_SD_MM, 3)
    warp, warp_origin, warp_shape = smooth_warp_field(rng, family.warp_rms_mm, family.warp_length_mm)

    # the pull-back chain, output world y -> template (see the package docstring)
    affine_ras, shape = site_grid(site, voxel_mm)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    world = torch.from_numpy(index @ affine_ras[:3, :3].T + affine_ras[:3, 3])
    center = torch.tensor(BRAIN_CENTER_MM, dtype=torch.float64)
    head_scale = torch.tensor(anatomy["head_scale"], dtype=torch.float64)
    # float32 from here on (1e-5 mm at 150 mm): halves the memory traffic of the stages below
    points = (center + (world - center - torch.from_numpy(shift)) @ torch.from_numpy(rotation) / head_scale).float()
    basis = structure_basis()
    atrophy = structure_displacement(disease["rates"])
    points = displaced(points, atrophy, basis.origin, basis.spacing, basis.shape)
    # anatomy: torque (a shear, determinant 1), smooth warp, then natural structure sizes nearest the template
    points[..., 0] += anatomy["torque_mm"] * torch.tanh((points[..., 1] - center[1]) / family.torque_length_mm)
    points = displaced(points, warp, warp_origin, WARP_GRID_MM, warp_shape)
    natural_sizes = structure_displacement(anatomy["rates"])
    points = displaced(points, natural_sizes, basis.origin, basis.spacing, basis.shape)

    template = load_template(round(0.4 * voxel_mm, 3))
    sampled = sample(template.channels, points, template.origin, template.spacing, template.shape).numpy()
    voxel_volume = float(abs(np.linalg.det(affine_ras[:3, :3])))
    volumes = {name: float(sampled[c].sum(dtype=np.float64) * voxel_volume)
               for c, name in ((1, "hippocampus_mm3"), (2, "ventricles_mm3"), (3, "brain_mm3"))}
    labels = None
    if save_labels:
        warped = sample(template.labels, points, template.origin, template.spacing, template.shape, mode="nearest")
        labels = reorient(np.rint(warped[0].numpy()).astype(np.uint8), affine_ras, site.orientation)[0]

    # the scanner: contrast, bias field, noise, dtype, orientation
    intensity = np.clip(sampled[0], 0.0, None) ** site.gamma * site.intensity_max
    intensity *= bias_field(rng, shape, site.bias_strength)
    sigma = site.noise * site.intensity_max * rng.uniform(0.8, 1.2)
    noise = rng.standard_normal((2 if site.rician else 1, *shape), dtype=np.float32) * sigma
    if site.rician:
        intensity = np.sqrt((intensity + noise[0]) ** 2 + noise[1] ** 2)
    else:
        intensity = np.clip(intensity + noise[0], 0.0, None)
    image, affine = reorient(to_site_dtype(intensity, site.dtype), affine_ras, site.orientation)

    truth = {
        "subject_id": spec.subject_id, "label": spec.label, "site": site.name, "split": spec.split,
        "key": list(spec.key), "ehr_true": ehr_true, **disease, "anatomy": anatomy, "volumes": volumes,
        "min_jacobian_atrophy": float(jacobian_determinant(atrophy, basis.spacing).min()),
        # a lower bound for the composed anatomy map: the product of its stages' minima (torque: 1)
        "min_jacobian_anatomy": float(jacobian_determinant(warp, WARP_GRID_MM).min()
                                      * jacobian_determinant(natural_sizes, basis.spacing).min()),
        "voxel_mm": [float(v) for v in np.asarray(site.voxel_scale) * voxel_mm],
        "orientation": site.orientation,
    }
    if truth["min_jacobian_atrophy"] <= 0 or truth["min_jacobian_anatomy"] <= 0:
        raise RuntimeError(f"{spec.subject_id}: folding warp (Jacobian <= 0): {truth}")
    return SimulatedSubject(spec, image, affine, labels, ehr_shown, truth)
