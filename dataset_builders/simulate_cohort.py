"""A deterministic simulated Alzheimer's-atrophy cohort made from one real brain (ICBM 2009c + CerebrA).

Every subject is the ICBM-2009c T1 template (with skull) resampled once, with trilinear
interpolation, through a chain of smooth warps, then "scanned" by one of several sites::

    output voxel --affine--> world y --head pose, size--> y' --atrophy--> y'' --anatomy--> template

Read from the template outwards, this is the subject's story: the template becomes the subject's own
healthy brain (anatomy), that brain atrophies, and the head is placed in the scanner. So atrophy is
relative to each subject's own anatomy, and a model's decision thresholds cannot fit one brain.

* **head pose / size**: a few degrees of rotation and a few mm of translation about the brain centre
  (``HEAD_ROTATION_SD_DEG``, ``HEAD_SHIFT_SD_MM``), and the subject's head size (an anatomy draw);
* **atrophy** (class-dependent): a curl-free displacement ``u = grad(psi)`` with ``laplacian(psi) = s``
  (solved by FFT on a 2 mm grid), where the source ``s`` is a smoothed, signed mask: positive inside
  the hippocampus, amygdala, entorhinal and parahippocampal cortex (pull-back divergence > 0, so these
  structures shrink in the output), positive in the cortex (global thinning) balanced by a negative
  source in the sulcal/extra-cerebral CSF (which widens), and negative in the lateral and
  inferior-lateral ventricles (which enlarge). Left and right are separate basis fields (the
  *structure basis*), so a subject's field is ``sum_k rate_k * u_k`` and costs a few multiply-adds;
* **anatomy** (class-independent, an ``AnatomyFamily``), in pull-back order: a brain torque, a smooth
  random warp, then natural structure sizes -- the structure basis again, with natural rates, sampled
  nearest the template, where the basis lives.

Approximation: the atrophy basis fields stay in template space and are applied at the subject's
coordinates ``y'`` instead of being carried through the subject's anatomy map. The atrophy pattern is
therefore the template's, displaced by the subject's anatomy (~3 mm RMS, more at the walls of
ventricles far from template size). The fields vary over 1-2 cm (Poisson potentials of smoothed
sources), so the shrinkage still falls on the subject's own structures.

Anatomy of the training family (``TRAINING_ANATOMY``); sources are from general knowledge of the
literature, and the measured values are below:

* **intracranial size**: linear head scale sd 0.035 (volume sd ~10%), +-0.02 by sex (men ~12% larger).
  ICV CV ~10%, men 10-12% larger (Buckner et al. 2004, NeuroImage 23:724; ADNI). All structures
  scale with the head (real ones scale sub-linearly), so raw volumes vary a little too much.
* **ventricles**: natural rate ~N(0.3, 0.45) (mean > 0: elderly ventricles are larger than those of
  the young-adult ICBM template), left-right asymmetry sd 0.12. The ventricles' log-volume moves
  ~0.5 per rate unit (measured: rate -0.8 gives 0.64x, +1.4 gives 1.97x the template volume), and
  ``RATE_LIMITS`` caps the rates where the Jacobian stays positive. Lateral ventricle volume CV is
  40-50% among healthy elderly, with a several-fold range (Nestor et al. 2008, Brain 131:2443, ADNI).
* **hippocampus / MTL**: natural rate sd 0.08, asymmetry sd 0.04. Hippocampal volume CV is ~10%
  (ADNI NC). The smooth warp alone already changes the hippocampal volume by ~9% (measured), so the
  rate sd is below the 0.17 that would give 10% on its own. The cortex rate sd is 0.012 (kept from 1.x).
* **smooth warp**: RMS 3 mm, Gaussian smoothing sigma ("correlation length") 25 mm, on an 8 mm control
  grid (``WARP_GRID_MM``). Residual nonlinear shape differences after affine registration are a few
  mm (e.g. Klein et al. 2009, NeuroImage 46:786).
* **brain torque** (petalia): pull-back ``u_x = t tanh((y - y_c) / 40 mm)`` with ``y_c`` the brain
  centre and ``t ~ N(1.5, 1)`` mm. For t > 0 the frontal midline moves left and the occipital one
  right: the usual right-frontal / left-occipital petalia ("Yakovlevian torque") of a few mm (Toga &
  Thompson 2003, Nat Rev Neurosci 4:37).

The held-out family (``HELD_OUT_ANATOMY``, split ``test_anatomy``) is one training never sees: warp
RMS 4 mm with sigma 45 mm (a different field), an anisotropic head (scale sd 0.04 per axis) and a
mirrored torque (mean -1.5 mm). The base is not mirrored left-right: the ICBM 2009c symmetric template
is its own mirror image (its mirrored T1 has identical voxels), so mirroring would only swap label ids.

Jacobians, checked for every subject (generation fails if one is <= 0): ``min_jacobian_atrophy`` of
the atrophy field, and ``min_jacobian_anatomy``, a lower bound for the anatomy map (the product of the
warp's and the natural sizes' minima; the torque is a shear with determinant 1).

Measured on the volumes in ``subjects.jsonl``, taken in the output images (brain mask as the ICV
proxy, soft hippocampus and lateral + inferior-lateral ventricle masks). The cohort is the demo's:
100 subjects/class, seed 0, ``--atrophy-scale 2.5``; version 1.1's values are in brackets:

* NC of the training anatomy (n = 100): ICV CV 0.125 [0.09], men 14% larger; ventricle volume CV
  0.35 [0.20], range 13-58 mL, 4.4x [2.6x] (5th-95th percentile 3.2x); hippocampal CV 0.20 raw,
  0.14 ICV-normalised [0.13]. The age term of the atrophy, exaggerated 2.5x, is part of this;
* NC of the held-out anatomy (n = 25): ICV CV 0.10, ventricles 0.27, hippocampus 0.15 raw / 0.11
  normalised;
* the smallest Jacobians over all 375 subjects: 0.063 for the anatomy (lower bound) and 0.113 for
  the atrophy;
* at the default ``atrophy_scale`` 1 (60/class), among the 60 training-anatomy NC: ICV CV 0.12,
  ventricles 0.35 (3.7x range), hippocampus 0.19 raw / 0.13 normalised;
* generation time: 87 s for the 375 subjects with ``--workers 2`` on 2 busy cores [101 s for 300].

Severity: a latent disease stage ``d`` per class (``CLASS_SEVERITY``, normal, overlapping) plus an
age term present in every class (``AGE_EFFECT`` per 10 years, older means more atrophy) gives the
atrophy index ``A``; the atrophy rates are ``A`` times ``ATROPHY_RATES`` (capped by ``RATE_LIMITS``).
Only the image sees ``A``. All disease-free variation is in the anatomy stage.

EHR (``age, sex, education_years, mmse, cdr_global``) is drawn from class-conditional
distributions loosely following MedBLIP's Table 1 (ADNI), then made weak on purpose: two knobs,

* ``ehr_informativeness`` (kappa in [0, 1], default 0.3): class means of MMSE/education are pulled
  towards the pooled mean and CDR class probabilities mixed with the pooled ones by ``1 - kappa``,
  and MMSE gets extra measurement noise growing with ``1 - kappa``;
* ``missing_prob`` (default 0.4): each field is independently missing (``null`` in ``ehr``,
  omitted from ``text`` by :func:`lavis_medblip.annotations.ehr.describe_ehr`).

:class:`EHRDistribution` holds these distributions; :func:`ehr_log_likelihood` scores a recorded EHR under
them, so the Bayes-optimal reader of the text is known (``benchmarks/text_only_vs_regression.py``: 0.54
balanced accuracy on 1,125 EHRs of the demo's settings).

With the defaults (measured on 60 subjects/class, seed 0, train on ``train``, test on ``test``):
logistic regression on the recorded EHR fields reaches ~0.45 balanced accuracy (0.45 on 6000
simulated EHRs; measured at version 1.1, and 2.0 draws the same EHRs), on the ICV-normalised
hippocampus and log ventricle volumes measured in the images 0.58 on ``test`` and 0.53 on
``test_anatomy`` (chance 0.33; 1.1: ~0.7 on ``test``). On the demo's cohort (100/class,
``--atrophy-scale 2.5``) the same regression reaches 0.68 and 0.57 [1.1: 0.81 on ``test``]. Raise
``ehr_informativeness`` / lower ``missing_prob`` for a more informative text; ``atrophy_scale``
scales the image signal.

Sites (``SITES``): three training sites and one held-out site, each with its own voxel size
(anisotropic for some), field of view (crop/pad and centre), stored orientation (RAS, LPS, a
permuted sagittal PIR, and the held-out LIA; the affine is always right, so
``nibabel.as_closest_canonical`` recovers RAS anatomy), data type and intensity scale, contrast
(gamma), smooth multiplicative bias field and Gaussian or Rician noise. The held-out site differs
from every training site in voxel size, orientation, dtype, contrast, bias and noise.

Output layout (one annotation file per split, all at the root, image paths relative to it)::

    OUT/cohort.json                    generation parameters, seed, version, sites, counts (cache key)
    OUT/train.jsonl, val.jsonl, test.jsonl, test_anatomy.jsonl
                                       lavis_medblip.annotations.schema records ("split" also set;
                                       "test" in both held-out files: the schema knows no other)
    OUT/subjects.jsonl                 ground truth per subject (split, severity, atrophy rates,
                                       anatomy draws, complete EHR, volumes measured in the output
                                       image, min Jacobians); not for training
    OUT/images/<site>/<subject>.nii.gz the T1 volume
    OUT/labels/<site>/<subject>.nii.gz warped CerebrA labels (only with save_labels=True)

Splits (``COHORT_SPLITS``): the training-anatomy subjects of the training sites go to
``train``/``val`` (subject-wise, stratified by class); the held-out site's subjects are ``test``
(``test_fraction`` of each class, training anatomy); ``test_anatomy`` holds as many more subjects per
class, of the held-out anatomy family at the training sites. Ids (``<site>-<number>``, numbered in a
shuffled order per site) name no class, and at a training site no split. Everything is
deterministic by seed: each subject's random numbers come from
``numpy.random.default_rng([seed, class_index, k])``, so volumes and annotations are byte-identical
across reruns, orderings and worker counts. A rerun whose parameters match
``cohort.json`` (and whose files exist) is a cache hit and does nothing.

Usage::

    python -m dataset_builders.simulate_cohort --out data/sim --subjects-per-class 60 --seed 0
    python -m dataset_builders.simulate_cohort --out /tmp/sim --subjects-per-class 4 --voxel-mm 4

    from dataset_builders.simulate_cohort import simulate_cohort
    result = simulate_cohort("data/sim", subjects_per_class=60, seed=0)
    result.annotation_files["train"]   # Path to train.jsonl
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import fft as sfft
from scipy import ndimage as ndi
from scipy.stats import norm

from lavis_medblip.assets import CEREBRA_LABEL_TABLE, CEREBRA_LABELS, ICBM_BRAIN_MASK, ICBM_T1
from lavis_medblip.annotations.ehr import describe_ehr
from lavis_medblip.annotations.schema import CLASS_NAMES, AnnotationRecord, write_annotations

#: Bump when a change alters the generated bytes (invalidates cohort.json cache hits).
GENERATOR_VERSION = "2.3"  # 2.1: EHR text with MMSE/CDR stages; 2.2: CDR 0.5 "very mild dementia"; 2.3: MMSE
# "N points below the maximum"; images as 2.0
COHORT_NAME = "SIM-ICBM2009c"

# --------------------------------------------------------------------------- anatomy (CerebrA ids)
HIPPOCAMPUS = {"right": 48, "left": 99}
AMYGDALA = {"right": 19, "left": 70}
ENTORHINAL = {"right": 36, "left": 87}
PARAHIPPOCAMPAL = {"right": 18, "left": 69}
LATERAL_VENTRICLE = {"right": 41, "left": 92}
INFERIOR_LATERAL_VENTRICLE = {"right": 5, "left": 56}
#: Relative shrink of the medial temporal structures for one unit of the MTL rate.
MTL_WEIGHTS = ((HIPPOCAMPUS, 1.0), (AMYGDALA, 0.9), (ENTORHINAL, 0.8), (PARAHIPPOCAMPAL, 0.6))
#: Relative enlargement of the ventricles (temporal horns enlarge the most in AD).
VENTRICLE_WEIGHTS = ((LATERAL_VENTRICLE, 1.0), (INFERIOR_LATERAL_VENTRICLE, 1.6))
HIPPOCAMPUS_IDS = tuple(HIPPOCAMPUS.values())
VENTRICLE_IDS = tuple(LATERAL_VENTRICLE.values()) + tuple(INFERIOR_LATERAL_VENTRICLE.values())
#: Approximate centre of the brain (mm, MNI) — head pose and the field of view are centred on it.
BRAIN_CENTER_MM = (0.0, -17.0, 5.0)
#: Spacing of the atrophy basis fields (mm); the template is 1 mm.
FIELD_MM = 2.0
BASIS_NAMES = ("mtl_right", "mtl_left", "ventricles_right", "ventricles_left", "cortex")

# --------------------------------------------------------------------------- disease model
#: Latent disease stage per class: (mean, sd) of a normal, clipped to [-0.2, 1.4]; overlapping.
CLASS_SEVERITY = {"NC": (0.0, 0.14), "MCI": (0.45, 0.17), "AD": (0.95, 0.2)}
#: Atrophy index increase per 10 years above REFERENCE_AGE, in every class.
AGE_EFFECT = 0.25
REFERENCE_AGE = 73.0
#: Source strength (~ fractional volume change) per unit atrophy index.
ATROPHY_RATES = {"mtl": 0.48, "ventricles": 0.6, "cortex": 0.08}
#: Caps on every structure-basis rate (atrophy and natural size alike) that keep each warp's Jacobian
#: positive: min 0.11 with every rate at its upper cap, as high as that allows, so that ``atrophy_scale`` > 1
#: exaggerates the atrophy rather than flattening it at the caps. Negative rates barely compress anything
#: (ventricles at -0.8: min Jacobian 0.98); that cap bounds how small natural ventricles get (0.64x template).
RATE_LIMITS = {"mtl": (-0.3, 1.5), "ventricles": (-0.8, 1.4), "cortex": (-0.06, 0.2)}
HEAD_ROTATION_SD_DEG = 3.0
HEAD_SHIFT_SD_MM = 3.0


# --------------------------------------------------------------------------- anatomy model (class-independent)
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
WARP_GRID_MM = 8.0

# --------------------------------------------------------------------------- EHR model (ADNI-like)
EHR_AGE = {"NC": (74.0, 6.0), "MCI": (73.0, 8.0), "AD": (75.0, 8.0)}
EHR_P_MALE = {"NC": 0.48, "MCI": 0.58, "AD": 0.55}
EHR_EDUCATION = {"NC": (16.4, 2.7), "MCI": (15.9, 2.9), "AD": (15.2, 3.0)}
EHR_MMSE = {"NC": (29.0, 1.1), "MCI": (27.5, 1.8), "AD": (23.3, 2.1)}
CDR_VALUES = (0.0, 0.5, 1.0, 2.0)
AGE_RANGE, EDUCATION_RANGE, MMSE_RANGE = (55.0, 95.0), (6, 20), (10, 30)
EHR_CDR_P = {"NC": (0.94, 0.06, 0.0, 0.0), "MCI": (0.04, 0.92, 0.04, 0.0), "AD": (0.0, 0.55, 0.40, 0.05)}


# --------------------------------------------------------------------------- sites
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
#: ``test``: the held-out site; ``test_anatomy``: the held-out anatomy family at the training sites.
COHORT_SPLITS = ("train", "val", "test", "test_anatomy")


# --------------------------------------------------------------------------- template and fields
@dataclass
class _Template:
    channels: torch.Tensor  # (1, 4, X, Y, Z): T1 in [0, 1], hippocampus, ventricles, brain mask
    labels: torch.Tensor  # (1, 1, X, Y, Z) float label ids
    origin: torch.Tensor  # world mm of voxel (0, 0, 0)
    spacing: torch.Tensor
    shape: torch.Tensor


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    if nib.aff2axcodes(image.affine) != ("R", "A", "S"):
        raise ValueError(f"{path}: expected an RAS template")
    return np.asanyarray(image.dataobj), image.affine


def cortical_label_ids() -> tuple[int, ...]:
    """CerebrA cortical labels (Mindboggle ids >= 2000), without entorhinal/parahippocampal (MTL)."""
    import csv

    ids = []
    with open(CEREBRA_LABEL_TABLE, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if int(row["Mindboggle ID"]) >= 2000:
                ids += [int(row["RH Label"]), int(row["LH Labels"])]
    excluded = set(ENTORHINAL.values()) | set(PARAHIPPOCAMPAL.values())
    return tuple(sorted(i for i in ids if i not in excluded))


@functools.lru_cache(maxsize=2)
def _template(smooth_mm: float) -> _Template:
    t1, affine = _load(ICBM_T1)
    labels, _ = _load(CEREBRA_LABELS)
    mask, _ = _load(ICBM_BRAIN_MASK)
    t1 = t1.astype(np.float32) / 255.0
    if smooth_mm > 0:  # anti-aliasing for the coarser output grids
        t1 = ndi.gaussian_filter(t1, smooth_mm, mode="constant")
    channels = np.stack([t1, np.isin(labels, HIPPOCAMPUS_IDS), np.isin(labels, VENTRICLE_IDS), mask > 0])
    return _Template(
        channels=torch.from_numpy(channels.astype(np.float32))[None],
        labels=torch.from_numpy(labels.astype(np.float32))[None, None],
        origin=torch.tensor(affine[:3, 3], dtype=torch.float64),
        spacing=torch.tensor(np.diag(affine)[:3], dtype=torch.float64),
        shape=torch.tensor(labels.shape, dtype=torch.float64),
    )


def _poisson_gradient(source: np.ndarray, spacing: float, pad: int = 24) -> np.ndarray:
    """``grad(psi)`` with ``laplacian(psi) = source`` (periodic FFT solve on a padded grid)."""
    padded = np.pad(source.astype(np.float64), pad)
    padded -= padded.mean()
    spectrum = sfft.rfftn(padded, workers=-1)
    eigen = np.zeros(spectrum.shape)
    for axis, n in enumerate(padded.shape):
        count = spectrum.shape[axis]
        freq = np.arange(count) if axis == padded.ndim - 1 else np.fft.fftfreq(n) * n
        shape = [1] * padded.ndim
        shape[axis] = count
        eigen = eigen + ((2 * np.cos(2 * np.pi * freq / n) - 2) / spacing**2).reshape(shape)
    eigen.flat[0] = 1.0
    spectrum /= eigen
    spectrum.flat[0] = 0.0
    psi = sfft.irfftn(spectrum, padded.shape, workers=-1)
    inner = tuple(slice(pad, pad + n) for n in source.shape)
    return np.stack(np.gradient(psi, spacing))[(slice(None),) + inner].astype(np.float32)


@dataclass
class StructureBasis:
    """Unit-rate displacement fields (mm) on a ``FIELD_MM`` grid in template (MNI) space.

    One basis serves both the natural structure sizes (anatomy stage) and the atrophy.
    """

    fields: torch.Tensor  # (len(BASIS_NAMES), 3, X, Y, Z)
    sources: np.ndarray  # (len(BASIS_NAMES), X, Y, Z) the signed source (= divergence) of each
    origin: torch.Tensor
    spacing: float
    shape: torch.Tensor


@functools.lru_cache(maxsize=1)
def structure_basis() -> StructureBasis:
    """Build (once per process, a few seconds) the per-structure displacement fields."""
    labels, affine = _load(CEREBRA_LABELS)
    t1, _ = _load(ICBM_T1)
    mask, _ = _load(ICBM_BRAIN_MASK)
    factor = int(FIELD_MM)
    pad = [(0, (-n) % factor) for n in labels.shape]

    def coarse(volume: np.ndarray) -> np.ndarray:  # block average, then smooth one coarse voxel
        volume = np.pad(volume.astype(np.float32), pad)
        shape = [n // factor for n in volume.shape]
        volume = volume.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))
        return ndi.gaussian_filter(volume, 1.0, mode="constant")

    def weighted(groups, side: str) -> np.ndarray:
        out = np.zeros(labels.shape, np.float32)
        for ids, weight in groups:
            out[labels == ids[side]] = weight
        return coarse(out)

    cortex = coarse(np.isin(labels, cortical_label_ids()))
    near_brain = ndi.binary_dilation(mask > 0, iterations=3)
    csf = coarse(near_brain & (t1 < 90) & (labels == 0))  # sulcal / extra-cerebral CSF
    sources = [
        weighted(MTL_WEIGHTS, "right"),
        weighted(MTL_WEIGHTS, "left"),
        -weighted(VENTRICLE_WEIGHTS, "right"),
        -weighted(VENTRICLE_WEIGHTS, "left"),
        cortex - csf * (cortex.sum() / csf.sum()),  # thinning balanced by widening sulci: skull stays
    ]
    fields = np.stack([_poisson_gradient(source, FIELD_MM) for source in sources])
    origin = affine[:3, 3] + (factor - 1) / 2.0  # centre of the first block
    return StructureBasis(
        fields=torch.from_numpy(fields),
        sources=np.stack(sources),
        origin=torch.tensor(origin, dtype=torch.float64),
        spacing=FIELD_MM,
        shape=torch.tensor(fields.shape[2:], dtype=torch.float64),
    )


def structure_displacement(rates: dict[str, float]) -> torch.Tensor:
    """The pull-back displacement (3, X, Y, Z) in mm of the structure basis for per-basis ``rates``.

    Positive ``mtl_*``/``cortex`` rates shrink those structures, positive ``ventricles_*`` rates
    enlarge the ventricles (the basis already carries the sign). Summed in a fixed order so the
    result does not depend on thread counts.
    """
    basis = structure_basis()
    total = torch.zeros_like(basis.fields[0])
    for index, name in enumerate(BASIS_NAMES):
        rate = float(rates.get(name, 0.0))
        if rate:
            total += rate * basis.fields[index]
    return total


def jacobian_determinant(displacement: torch.Tensor | np.ndarray, spacing: float) -> np.ndarray:
    """``det(I + grad u)`` of the map ``x -> x + u(x)`` for ``u`` of shape (3, X, Y, Z) in mm.

    numpy, single-threaded: torch's threaded ``gradient`` is 10x slower when the cores are busy.
    """
    u = np.asarray(displacement, dtype=np.float32)
    grads = [np.gradient(u[c], spacing) for c in range(3)]  # grads[c][d] = du_c/dx_d
    j = [[grads[c][d] + (1.0 if c == d else 0.0) for d in range(3)] for c in range(3)]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def _normalized(points: torch.Tensor, origin: torch.Tensor, spacing, shape: torch.Tensor) -> torch.Tensor:
    """World mm (..., 3) → grid_sample coordinates (align_corners=True, reversed axis order)."""
    scale = 2.0 / ((shape - 1) * spacing)
    offset = -1.0 - origin * scale
    # one fused float32 pass: this runs several times per subject over every output voxel
    return torch.addcmul(offset.flip(-1).float(), points.float().flip(-1), scale.flip(-1).float())


def _sample(volume: torch.Tensor, points: torch.Tensor, origin, spacing, shape, mode="bilinear") -> torch.Tensor:
    grid = _normalized(points, origin, spacing, shape)[None]
    out = F.grid_sample(volume, grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out[0]  # (C, X, Y, Z)


def _smooth_warp_field(rng: np.random.Generator, rms_mm: float, length_mm: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth random displacement (3, X, Y, Z) on a coarse grid over the template, with its origin and shape."""
    lo = np.array([-96.0, -132.0, -78.0]) - 16.0
    shape = np.ceil((np.array([193.0, 229.0, 193.0]) + 32.0) / WARP_GRID_MM).astype(int) + 1
    noise = rng.standard_normal((3, *shape))
    field = np.stack([ndi.gaussian_filter(component, length_mm / WARP_GRID_MM, mode="wrap") for component in noise])
    field *= rms_mm / np.sqrt(np.mean(field**2))
    return (torch.from_numpy(field.astype(np.float32)), torch.tensor(lo, dtype=torch.float64),
            torch.tensor(shape, dtype=torch.float64))


def _displaced(points: torch.Tensor, displacement: torch.Tensor, origin, spacing, shape) -> torch.Tensor:
    """One pull-back stage: ``p -> p + u(p)`` for a displacement (3, X, Y, Z) on the given grid."""
    return points + _sample(displacement[None], points, origin, spacing, shape).permute(1, 2, 3, 0)


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# --------------------------------------------------------------------------- subjects
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


@dataclass(frozen=True)
class EHRDistribution:
    """The simulator's EHR model of one class at one informativeness (kappa): what :func:`_draw_ehr` draws from
    and :func:`ehr_log_likelihood` scores. Numbers are drawn as normals, then clipped and rounded."""

    age: tuple[float, float]  # mean, sd (years; clipped to AGE_RANGE, rounded to 0.1)
    p_male: float
    education: tuple[float, float]  # mean, sd (years; clipped to EDUCATION_RANGE, rounded)
    mmse: tuple[float, float]  # mean, sd with measurement noise (clipped to MMSE_RANGE, rounded)
    cdr: tuple[float, ...]  # probability of each of CDR_VALUES

    @classmethod
    def of(cls, label: str, kappa: float) -> "EHRDistribution":
        def pulled(table: dict) -> tuple[float, float]:
            pooled = float(np.mean([mean for mean, _ in table.values()]))
            mean, sd = table[label]
            return pooled + kappa * (mean - pooled), sd

        mmse_mean, mmse_sd = pulled(EHR_MMSE)
        pooled_cdr = np.mean([EHR_CDR_P[name] for name in CLASS_NAMES], axis=0)
        p_cdr = kappa * np.asarray(EHR_CDR_P[label]) + (1.0 - kappa) * pooled_cdr
        return cls(age=EHR_AGE[label], p_male=EHR_P_MALE[label], education=pulled(EHR_EDUCATION),
                   mmse=(mmse_mean, math.hypot(mmse_sd, 2.5 * (1.0 - kappa))),  # noise grows as kappa falls
                   cdr=tuple(p_cdr / p_cdr.sum()))


def _draw_ehr(rng: np.random.Generator, label: str, kappa: float, missing_prob: float) -> tuple[dict, dict]:
    """Complete (true) EHR and the recorded one with missing fields set to None."""
    model = EHRDistribution.of(label, kappa)
    age = float(np.clip(rng.normal(*model.age), *AGE_RANGE))
    sex = "M" if rng.random() < model.p_male else "F"
    education = int(np.clip(round(rng.normal(*model.education)), *EDUCATION_RANGE))
    mmse = int(np.clip(round(rng.normal(*model.mmse)), *MMSE_RANGE))
    cdr = float(CDR_VALUES[int(rng.choice(len(CDR_VALUES), p=model.cdr))])
    true = {"age": round(age, 1), "sex": sex, "education_years": education, "mmse": mmse, "cdr_global": cdr}
    missing = rng.random(len(true)) < missing_prob
    shown = {key: (None if gone else value) for (key, value), gone in zip(true.items(), missing)}
    return true, shown


def ehr_log_likelihood(ehr: dict[str, Any], label: str, kappa: float) -> float:
    """log p(recorded EHR | class) under the simulator's EHR model, for the Bayes-optimal reader of the text.

    Fields go missing independently of the class, so a missing one (None) adds nothing. Integers and ages are
    the probabilities of their rounding intervals (at a clipping bound: everything beyond it).
    """
    model = EHRDistribution.of(label, kappa)

    def interval(value: float, mean_sd: tuple[float, float], bounds: tuple[float, float], step: float) -> float:
        low = -np.inf if value <= bounds[0] else value - step / 2
        high = np.inf if value >= bounds[1] else value + step / 2
        return float(np.log(max(norm.cdf(high, *mean_sd) - norm.cdf(low, *mean_sd), 1e-300)))

    log_likelihood = 0.0
    if ehr.get("age") is not None:
        log_likelihood += interval(ehr["age"], model.age, AGE_RANGE, 0.1)
    if ehr.get("sex") is not None:
        log_likelihood += math.log(model.p_male if ehr["sex"] == "M" else 1.0 - model.p_male)
    if ehr.get("education_years") is not None:
        log_likelihood += interval(ehr["education_years"], model.education, EDUCATION_RANGE, 1.0)
    if ehr.get("mmse") is not None:
        log_likelihood += interval(ehr["mmse"], model.mmse, MMSE_RANGE, 1.0)
    if ehr.get("cdr_global") is not None:
        log_likelihood += math.log(max(model.cdr[CDR_VALUES.index(ehr["cdr_global"])], 1e-300))
    return log_likelihood


def _capped_rates(common: dict[str, float], asymmetry: dict[str, float]) -> dict[str, float]:
    """Per-basis rates from per-group ones (right = common + asymmetry, left = common - asymmetry), capped."""
    rates = {}
    for name in BASIS_NAMES:
        group, _, side = name.partition("_")
        value = common[group] + {"right": 1.0, "left": -1.0, "": 0.0}[side] * asymmetry.get(group, 0.0)
        rates[name] = float(np.clip(value, *RATE_LIMITS[group]))
    return rates


def _draw_atrophy(rng: np.random.Generator, label: str, age: float, atrophy_scale: float) -> dict[str, Any]:
    mean, sd = CLASS_SEVERITY[label]
    stage = float(np.clip(rng.normal(mean, sd), -0.2, 1.4))
    index = float(np.clip(stage + AGE_EFFECT * (age - REFERENCE_AGE) / 10.0, -0.3, 1.6)) * atrophy_scale
    rates = _capped_rates({group: rate * index for group, rate in ATROPHY_RATES.items()}, {})
    return {"disease_stage": stage, "atrophy_index": index, "rates": rates}


def _draw_anatomy(rng: np.random.Generator, family: AnatomyFamily, sex: str) -> dict[str, Any]:
    """The class-independent draws of one subject's healthy anatomy (the warp field is drawn after)."""
    offset = family.head_scale_sex_offset if sex == "M" else -family.head_scale_sex_offset
    scale = 1.0 + offset + rng.normal(0.0, family.head_scale_sd, 3 if family.head_scale_anisotropic else 1)
    ventricle_mean, ventricle_sd = family.ventricle_rate
    common = {"ventricles": rng.normal(ventricle_mean, ventricle_sd), "mtl": rng.normal(0.0, family.mtl_rate_sd),
              "cortex": rng.normal(0.0, family.cortex_rate_sd)}
    asymmetry = {"ventricles": rng.normal(0.0, family.ventricle_asymmetry_sd),
                 "mtl": rng.normal(0.0, family.mtl_asymmetry_sd)}
    return {"family": family.name, "head_scale": [float(v) for v in np.broadcast_to(scale, 3)],
            "rates": _capped_rates(common, asymmetry), "torque_mm": float(rng.normal(*family.torque_mm))}


def _site_grid(site: Site, voxel_mm: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    voxel = np.asarray(site.voxel_scale) * voxel_mm
    shape = tuple(int(round(f / v)) for f, v in zip(site.fov_mm, voxel))
    center = np.asarray(BRAIN_CENTER_MM) + np.asarray(site.center_shift_mm)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(voxel)
    affine[:3, 3] = center - (np.asarray(shape) - 1) / 2.0 * voxel
    return affine, shape


def _bias_field(rng: np.random.Generator, shape: Sequence[int], strength: float) -> np.ndarray:
    """exp of a random quadratic polynomial over the field of view (smooth, multiplicative)."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = (x, y, z, x * y, x * z, y * z, x * x, y * y, z * z)
    coef = rng.normal(0.0, strength, len(terms)) * np.array([1, 1, 1, .5, .5, .5, .5, .5, .5])
    log_bias = sum(c * t for c, t in zip(coef, terms))
    return np.exp(log_bias - np.mean(log_bias)).astype(np.float32)


def _to_site_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return values.astype(np.float32)
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype)


def _reorient(array: np.ndarray, affine_ras: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """Store an RAS array in ``codes`` orientation, with the affine that keeps world positions."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.axcodes2ornt(tuple(codes)))
    stored = np.ascontiguousarray(nib.orientations.apply_orientation(array, transform))
    affine = affine_ras @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return stored, affine


def simulate_subject(spec: SubjectSpec, *, voxel_mm: float = 2.0, ehr_informativeness: float = 0.3,
                     missing_prob: float = 0.4, atrophy_scale: float = 1.0,
                     save_labels: bool = False) -> SimulatedSubject:
    """Generate one subject's volume, EHR and ground truth from ``spec.key`` alone."""
    site = next(s for s in SITES if s.name == spec.site)
    rng = np.random.default_rng(list(spec.key))
    ehr_true, ehr_shown = _draw_ehr(rng, spec.label, ehr_informativeness, missing_prob)
    disease = _draw_atrophy(rng, spec.label, ehr_true["age"], atrophy_scale)
    family = ANATOMY_FAMILIES[spec.anatomy_family]
    anatomy = _draw_anatomy(rng, family, ehr_true["sex"])
    rotation = _rotation(rng.normal(0.0, HEAD_ROTATION_SD_DEG, 3))
    shift = rng.normal(0.0, HEAD_SHIFT_SD_MM, 3)
    warp, warp_origin, warp_shape = _smooth_warp_field(rng, family.warp_rms_mm, family.warp_length_mm)

    # the pull-back chain, output world y -> template (see the module docstring)
    affine_ras, shape = _site_grid(site, voxel_mm)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    world = torch.from_numpy(index @ affine_ras[:3, :3].T + affine_ras[:3, 3])
    center = torch.tensor(BRAIN_CENTER_MM, dtype=torch.float64)
    head_scale = torch.tensor(anatomy["head_scale"], dtype=torch.float64)
    # float32 from here on (1e-5 mm at 150 mm): halves the memory traffic of the stages below
    points = (center + (world - center - torch.from_numpy(shift)) @ torch.from_numpy(rotation) / head_scale).float()
    basis = structure_basis()
    atrophy = structure_displacement(disease["rates"])
    points = _displaced(points, atrophy, basis.origin, basis.spacing, basis.shape)
    # anatomy: torque (a shear, determinant 1), smooth warp, then natural structure sizes nearest the template
    points[..., 0] += anatomy["torque_mm"] * torch.tanh((points[..., 1] - center[1]) / family.torque_length_mm)
    points = _displaced(points, warp, warp_origin, WARP_GRID_MM, warp_shape)
    natural_sizes = structure_displacement(anatomy["rates"])
    points = _displaced(points, natural_sizes, basis.origin, basis.spacing, basis.shape)

    template = _template(round(0.4 * voxel_mm, 3))
    sampled = _sample(template.channels, points, template.origin, template.spacing, template.shape).numpy()
    voxel_volume = float(abs(np.linalg.det(affine_ras[:3, :3])))
    volumes = {name: float(sampled[c].sum(dtype=np.float64) * voxel_volume)
               for c, name in ((1, "hippocampus_mm3"), (2, "ventricles_mm3"), (3, "brain_mm3"))}
    labels = None
    if save_labels:
        warped = _sample(template.labels, points, template.origin, template.spacing, template.shape, mode="nearest")
        labels = _reorient(np.rint(warped[0].numpy()).astype(np.uint8), affine_ras, site.orientation)[0]

    # the scanner: contrast, bias field, noise, dtype, orientation
    intensity = np.clip(sampled[0], 0.0, None) ** site.gamma * site.intensity_max
    intensity *= _bias_field(rng, shape, site.bias_strength)
    sigma = site.noise * site.intensity_max * rng.uniform(0.8, 1.2)
    noise = rng.standard_normal((2 if site.rician else 1, *shape), dtype=np.float32) * sigma
    if site.rician:
        intensity = np.sqrt((intensity + noise[0]) ** 2 + noise[1] ** 2)
    else:
        intensity = np.clip(intensity + noise[0], 0.0, None)
    image, affine = _reorient(_to_site_dtype(intensity, site.dtype), affine_ras, site.orientation)

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


# --------------------------------------------------------------------------- cohort
@dataclass
class CohortResult:
    out_dir: Path
    annotation_files: dict[str, Path]
    subjects_file: Path
    cohort_file: Path
    n_subjects: int
    cache_hit: bool
    seconds: float = 0.0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def plan_cohort(subjects_per_class: int, seed: int, *, test_fraction: float = 0.25,
                val_fraction: float = 0.15) -> list[SubjectSpec]:
    """Who is where: sites, splits, anatomy families and public ids, deterministic by seed.

    Per class, ``subjects_per_class`` subjects of the training anatomy (``test`` at the held-out site, the
    rest ``train``/``val`` at the training sites) plus as many ``test_anatomy`` subjects as ``test``, of the
    held-out anatomy at the training sites. Ids number each site's subjects in a shuffled order, so they
    name neither class nor split.
    """
    n_test = int(round(subjects_per_class * test_fraction))
    n_train_sites = len(TRAINING_SITES)
    members: dict[str, list[tuple[int, int]]] = {site.name: [] for site in SITES}
    for c in range(len(CLASS_NAMES)):
        for k in range(subjects_per_class + n_test):
            if k < n_test:
                site = HELD_OUT_SITE
            else:  # the training anatomy, then the held-out anatomy, each dealt round the training sites
                position = k - n_test if k < subjects_per_class else k - subjects_per_class
                site = TRAINING_SITES[position % n_train_sites]
            members[site.name].append((c, k))
    # validation: per class, a fraction of the training-site subjects of the training anatomy
    split_rng = np.random.default_rng([seed, 1_000_003])
    val = set()
    for c in range(len(CLASS_NAMES)):
        candidates = [(c, k) for k in range(n_test, subjects_per_class)]
        n_val = int(round(len(candidates) * val_fraction))
        for i in split_rng.permutation(len(candidates))[:n_val]:
            val.add(candidates[i])
    specs = []
    for s, site in enumerate(SITES):
        order = np.random.default_rng([seed, 2_000_003, s]).permutation(len(members[site.name]))
        for number, i in enumerate(order):
            c, k = members[site.name][i]
            held_out_anatomy = k >= subjects_per_class
            if site.held_out:
                split = "test"
            elif held_out_anatomy:
                split = "test_anatomy"
            else:
                split = "val" if (c, k) in val else "train"
            family = HELD_OUT_ANATOMY if held_out_anatomy else TRAINING_ANATOMY
            specs.append(SubjectSpec(f"{site.name}-{number:04d}", CLASS_NAMES[c], site.name, split, (seed, c, k),
                                     family.name))
    return specs


def _image_path(spec: SubjectSpec, kind: str = "images") -> str:
    return f"{kind}/{spec.site}/{spec.subject_id}.nii.gz"


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(image, str(tmp))
    tmp.replace(path)


def _record(spec: SubjectSpec, ehr: dict[str, Any]) -> AnnotationRecord:
    """A subject's annotation line; the schema knows train/val/test: both held-out sets are "test" records."""
    return AnnotationRecord(
        image=_image_path(spec), subject_id=spec.subject_id, label=spec.label,
        split="test" if spec.split == "test_anatomy" else spec.split,
        text=describe_ehr(ehr), visit="bl", cohort=COHORT_NAME, site=spec.site, ehr=ehr,
    )


def simulate_ehr_records(subjects_per_class: int, seed: int, *, ehr_informativeness: float = 0.3,
                         missing_prob: float = 0.4) -> list[AnnotationRecord]:
    """Every subject of a cohort's plan with the EHR the cohort would give it, and no scan simulated.

    The EHR is drawn first from the subject's key, so it is the cohort's to the letter; ``image`` names where
    the scan would be, and no file is written. For models that read no scan (text only, the EHR regression),
    measured on more subjects than the scans' cost allows (``benchmarks/text_only_vs_regression.py``).
    """
    return [_record(spec, _draw_ehr(np.random.default_rng(list(spec.key)), spec.label, ehr_informativeness,
                                    missing_prob)[1]) for spec in plan_cohort(subjects_per_class, seed)]


def _generate_and_save(spec: SubjectSpec, out_dir: Path, options: dict) -> tuple[AnnotationRecord, dict]:
    subject = simulate_subject(spec, **options)
    _save_nifti(subject.image, subject.affine, out_dir / _image_path(spec))
    if subject.labels is not None:
        _save_nifti(subject.labels, subject.affine, out_dir / _image_path(spec, "labels"))
    return _record(spec, subject.ehr), dict(subject.truth, image=_image_path(spec))


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker(args):
    return _generate_and_save(*args)


def simulate_cohort(out_dir: str | Path, subjects_per_class: int = 60, seed: int = 0, *,
                    voxel_mm: float = 2.0, test_fraction: float = 0.25, val_fraction: float = 0.15,
                    ehr_informativeness: float = 0.3, missing_prob: float = 0.4, atrophy_scale: float = 1.0,
                    save_labels: bool = False, workers: int = 1, force: bool = False,
                    progress: bool = True, splits: Sequence[str] = COHORT_SPLITS) -> CohortResult:
    """Write the cohort to ``out_dir`` (see the module docstring); a matching ``cohort.json`` is a cache hit.

    ``workers`` > 1 uses that many spawned processes (each builds the template and basis once,
    a few seconds); the output does not depend on it. ``splits`` keeps only those splits' subjects (each as the
    whole plan would draw it): e.g. fresh held-out sets for trained models, without simulating a training set.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    parameters = {
        "subjects_per_class": int(subjects_per_class), "seed": int(seed), "voxel_mm": float(voxel_mm),
        "test_fraction": float(test_fraction), "val_fraction": float(val_fraction),
        "ehr_informativeness": float(ehr_informativeness), "missing_prob": float(missing_prob),
        "atrophy_scale": float(atrophy_scale), "save_labels": bool(save_labels),
    }
    unknown = set(splits) - set(COHORT_SPLITS)
    if unknown or not splits:
        raise ValueError(f"splits must be some of {COHORT_SPLITS} (got {list(splits)})")
    splits = tuple(split for split in COHORT_SPLITS if split in splits)
    if splits != COHORT_SPLITS:  # the whole cohort's cache key stays as it was before splits existed
        parameters["splits"] = list(splits)
    cohort_file = out_dir / "cohort.json"
    annotation_files = {split: out_dir / f"{split}.jsonl" for split in splits}
    subjects_file = out_dir / "subjects.jsonl"
    specs = [spec for spec in plan_cohort(subjects_per_class, seed, test_fraction=test_fraction,
                                          val_fraction=val_fraction) if spec.split in splits]
    if not force and cohort_file.exists():
        previous = json.loads(cohort_file.read_text(encoding="utf-8"))
        files = [out_dir / _image_path(spec) for spec in specs] + list(annotation_files.values()) + [subjects_file]
        if (previous.get("version") == GENERATOR_VERSION and previous.get("parameters") == parameters
                and all(path.exists() for path in files)):
            return CohortResult(out_dir, annotation_files, subjects_file, cohort_file, len(specs), True,
                                time.perf_counter() - start, previous.get("counts", {}))
    cohort_file.unlink(missing_ok=True)  # written last: a partial run is never a cache hit

    options = {"voxel_mm": voxel_mm, "ehr_informativeness": ehr_informativeness,
               "missing_prob": missing_prob, "atrophy_scale": atrophy_scale, "save_labels": save_labels}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(specs), desc="simulating subjects", unit="subject", disable=not progress)
    results: list[tuple[AnnotationRecord, dict]] = []
    if workers <= 1:
        for spec in specs:
            results.append(_generate_and_save(spec, out_dir, options))
            bar.update()
    else:
        import multiprocessing

        threads = max(1, torch.get_num_threads() // workers)
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_worker_init, initargs=(threads,)) as pool:
            for result in pool.imap(_worker, [(spec, out_dir, options) for spec in specs]):
                results.append(result)
                bar.update()
    bar.close()

    counts: dict[str, dict[str, int]] = {}
    for split, path in annotation_files.items():
        records = [record for record, truth in results if truth["split"] == split]
        write_annotations(path, records)
        counts[split] = {name: sum(r.label == name for r in records) for name in CLASS_NAMES}
    with subjects_file.open("w", encoding="utf-8") as handle:
        for _, truth in results:
            handle.write(json.dumps(truth, sort_keys=True) + "\n")
    manifest = {
        "generator": "dataset_builders.simulate_cohort", "version": GENERATOR_VERSION, "cohort": COHORT_NAME,
        "parameters": parameters,
        "sites": [dict(asdict(site), voxel_mm=[v * voxel_mm for v in site.voxel_scale]) for site in SITES],
        "held_out_site": HELD_OUT_SITE.name, "counts": counts,
        "anatomy_families": {name: asdict(family) for name, family in ANATOMY_FAMILIES.items()},
        "split_anatomy": {split: (HELD_OUT_ANATOMY if split == "test_anatomy" else TRAINING_ANATOMY).name
                          for split in splits},
        "annotation_files": {split: path.name for split, path in annotation_files.items()},
        "template": "ICBM 2009c nonlinear symmetric T1 + CerebrA labels (lavis_medblip.assets)",
    }
    cohort_file.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return CohortResult(out_dir, annotation_files, subjects_file, cohort_file, len(specs), False,
                        time.perf_counter() - start, counts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--subjects-per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--voxel-mm", type=float, default=2.0, help="base voxel size; sites scale it")
    parser.add_argument("--test-fraction", type=float, default=0.25,
                        help="share of each class at the held-out site (test); test_anatomy adds as many")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="share of training-site subjects for val")
    parser.add_argument("--ehr-informativeness", type=float, default=0.3,
                        help="0 = EHR independent of class, 1 = ADNI-like Table 1 separation")
    parser.add_argument("--missing-prob", type=float, default=0.4, help="probability each EHR field is missing")
    parser.add_argument("--atrophy-scale", type=float, default=1.0, help="multiplies every subject's atrophy")
    parser.add_argument("--save-labels", action="store_true", help="also write the warped CerebrA labels")
    parser.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    parser.add_argument("--force", action="store_true", help="regenerate even if cohort.json matches")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    result = simulate_cohort(
        args.out, args.subjects_per_class, args.seed, voxel_mm=args.voxel_mm, test_fraction=args.test_fraction,
        val_fraction=args.val_fraction, ehr_informativeness=args.ehr_informativeness,
        missing_prob=args.missing_prob, atrophy_scale=args.atrophy_scale, save_labels=args.save_labels,
        workers=args.workers, force=args.force, progress=not args.quiet)
    if result.cache_hit:
        print(f"cache hit: {result.cohort_file} matches; nothing to do")
    else:
        per_subject = result.seconds / max(result.n_subjects, 1)
        print(f"wrote {result.n_subjects} subjects to {result.out_dir} in {result.seconds:.1f} s "
              f"({per_subject:.2f} s/subject); counts {result.counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
