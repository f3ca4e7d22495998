"""Template space: the ICBM template and CerebrA labels, the structure basis (per-structure displacement fields
that both natural sizes and atrophy scale), smooth random warps, and the grid sampling every pull-back stage uses."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import fft as sfft
from scipy import ndimage as ndi

from lavis_medblip.assets import CEREBRA_LABEL_TABLE, CEREBRA_LABELS, ICBM_BRAIN_MASK, ICBM_T1

#: CerebrA label ids of the structures the basis moves.
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
#: Caps on every structure-basis rate (atrophy and natural size alike) that keep each warp's Jacobian
#: positive: min 0.11 with every rate at its upper cap, as high as that allows, so that ``atrophy_scale`` > 1
#: exaggerates the atrophy rather than flattening it at the caps. Negative rates barely compress anything
#: (ventricles at -0.8: min Jacobian 0.98); that cap bounds how small natural ventricles get (0.64x template).
RATE_LIMITS = {"mtl": (-0.3, 1.5), "ventricles": (-0.8, 1.4), "cortex": (-0.06, 0.2)}
#: Control-grid spacing (mm) of the smooth random warps of the anatomy stage.
WARP_GRID_MM = 8.0


@dataclass
class Template:
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
def load_template(smooth_mm: float) -> Template:
    t1, affine = _load(ICBM_T1)
    labels, _ = _load(CEREBRA_LABELS)
    mask, _ = _load(ICBM_BRAIN_MASK)
    t1 = t1.astype(np.float32) / 255.0
    if smooth_mm > 0:  # anti-aliasing for the coarser output grids
        t1 = ndi.gaussian_filter(t1, smooth_mm, mode="constant")
    channels = np.stack([t1, np.isin(labels, HIPPOCAMPUS_IDS), np.isin(labels, VENTRICLE_IDS), mask > 0])
    return Template(
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


def sample(volume: torch.Tensor, points: torch.Tensor, origin, spacing, shape, mode="bilinear") -> torch.Tensor:
    grid = _normalized(points, origin, spacing, shape)[None]
    out = F.grid_sample(volume, grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out[0]  # (C, X, Y, Z)


def smooth_warp_field(rng: np.random.Generator, rms_mm: float, length_mm: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth random displacement (3, X, Y, Z) on a coarse grid over the template, with its origin and shape."""
    lo = np.array([-96.0, -132.0, -78.0]) - 16.0
    shape = np.ceil((np.array([193.0, 229.0, 193.0]) + 32.0) / WARP_GRID_MM).astype(int) + 1
    noise = rng.standard_normal((3, *shape))
    field = np.stack([ndi.gaussian_filter(component, length_mm / WARP_GRID_MM, mode="wrap") for component in noise])
    field *= rms_mm / np.sqrt(np.mean(field**2))
    return (torch.from_numpy(field.astype(np.float32)), torch.tensor(lo, dtype=torch.float64),
            torch.tensor(shape, dtype=torch.float64))


def displaced(points: torch.Tensor, displacement: torch.Tensor, origin, spacing, shape) -> torch.Tensor:
    """One pull-back stage: ``p -> p + u(p)`` for a displacement (3, X, Y, Z) on the given grid."""
    return points + sample(displacement[None], points, origin, spacing, shape).permute(1, 2, 3, 0)


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def capped_rates(common: dict[str, float], asymmetry: dict[str, float]) -> dict[str, float]:
    """Per-basis rates from per-group ones (right = common + asymmetry, left = common - asymmetry), capped."""
    rates = {}
    for name in BASIS_NAMES:
        group, _, side = name.partition("_")
        value = common[group] + {"right": 1.0, "left": -1.0, "": 0.0}[side] * asymmetry.get(group, 0.0)
        rates[name] = float(np.clip(value, *RATE_LIMITS[group]))
    return rates
