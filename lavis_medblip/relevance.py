"""Relevance maps of a scan, on the scan's own voxel grid: :func:`explain_scan` is the one entry point of the
predict CLI (``--relevance``) and the web app.

The model explains its input cube (:mod:`lavis_medblip.models.explain`); this module carries that map back
through the volume processor's geometry and names the atlas regions it falls in:

* **back to the scan**: the processor keeps, with every step, the affine from the cube's voxels to the scan's
  world mm (reorientation to RAS, resize, centre pad, or the field-of-view resampling), and
  ``register_to_template`` records its affine fit (:class:`~lavis_medblip.processors.volume_types.TemplateAlignment`).
  Each scan voxel is taken to world mm by the scan's own affine, from there to the cube (through the inverse
  registration when there was one) and sampled trilinearly (zero outside the cube). The NIfTI written has the
  scan's shape and affine, so FSLeyes, ITK-SNAP or nilearn overlay it on the original scan.
* **regions**: the vendored CerebrA atlas (ICBM 2009c space) on the cube's grid: each 1 mm atlas voxel counts
  for the cube voxel it falls in, so a region's share is the relevance mass of the cube voxels it covers,
  weighted by how much of each it covers, over the whole map's mass (the shares sum to at most 1; the rest
  falls outside every region, e.g. in white matter, which CerebrA does not label). With ``register_to_template``
  the cube *is* template space; without it the scan's world mm are taken as MNI mm, which holds for scans
  registered to MNI beforehand (as the paper's ADNI scans were) and only roughly otherwise.
"""
from __future__ import annotations

import csv
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from lavis_medblip.assets import CEREBRA_LABEL_TABLE, CEREBRA_LABELS
from lavis_medblip.inference import Prediction, Predictor
from lavis_medblip.processors.readers import scan_name
from lavis_medblip.processors.transforms import EnsureVolume3D
from lavis_medblip.processors.volume_types import TemplateAlignment, degenerate_volume_warnings

TOP_REGIONS = 10


@dataclass(frozen=True)
class ScanGeometry:
    """Where the model's input cube lies relative to the scan it was made from.

    ``cube_affine`` maps the cube's voxels to world mm: the scan's world, or template (MNI) space when the scan
    was registered (then ``alignment`` leads back to the scan's world).
    """

    shape: tuple[int, int, int]  # the scan's voxel grid
    affine: np.ndarray  # the scan's voxels -> world mm (its file's affine)
    cube_size: int
    cube_affine: np.ndarray
    alignment: TemplateAlignment | None = None


@dataclass
class ScanRelevance:
    """:func:`explain_scan`'s answer: the map on the scan's grid and in model space, and what it covers."""

    image: nib.Nifti1Image  # float32, the scan's shape and affine
    model_space: torch.Tensor  # (S, S, S), the model input's grid
    top_regions: list[tuple[str, float]]  # (CerebrA region, share of the relevance mass), largest first
    answer: str  # the answer explained
    method: str
    seconds: float  # reading and preprocessing, prediction, relevance, mapping back
    prediction: Prediction | None = None  # the predictor's diagnosis of the scan
    warning: str = ""  # "; "-joined DegenerateVolumeWarning messages
    region_shares: dict[str, float] = field(default_factory=dict)  # every region with relevance
    timings: dict[str, float] = field(default_factory=dict)  # seconds: read (and preprocess), predict, relevance, mapping


def read_scan(processor: Any, path: str | Path) -> tuple[torch.Tensor, ScanGeometry, str]:
    """What ``processor(path)`` returns without its cache (1, S, S, S), the geometry that made it, and warnings.

    Raises ``VolumeReadError`` naming the file when it cannot be read.
    """
    with degenerate_volume_warnings() as degenerate:
        raw = processor.read(path)
        volume = processor.transform(raw)
    shape = tuple(int(n) for n in EnsureVolume3D(1)(raw).data.shape)
    cube = processor.deviation(volume.data.to(processor.dtype))
    geometry = ScanGeometry(shape, np.asarray(raw.affine, dtype=np.float64), int(cube.shape[-1]),
                            np.asarray(volume.affine, dtype=np.float64), volume.template_alignment)
    return cube, geometry, "; ".join(degenerate)


# ---- back to the scan's grid -------------------------------------------------------------------------------


def scan_to_cube_coordinates(geometry: ScanGeometry) -> np.ndarray:
    """The affine (4, 4) from the scan's voxel indices to ``grid_sample`` coordinates of the model cube ((x, y, z)
    = (last, middle, first axis), ``align_corners=False``): scan voxels -> world mm -> the cube (-> the template
    cube, by inverting the registration's fit)."""
    size, alignment = geometry.cube_size, geometry.alignment
    cube_affine = alignment.subject_affine if alignment is not None else geometry.cube_affine
    normalise = np.diag([2.0 / size] * 3 + [1.0])
    normalise[:3, 3] = 1.0 / size - 1.0
    flip = np.eye(4)[[2, 1, 0, 3]]
    total = flip @ normalise @ np.linalg.inv(cube_affine) @ geometry.affine
    if alignment is None:
        return total
    return np.linalg.inv(np.vstack([alignment.theta, [0.0, 0.0, 0.0, 1.0]])) @ total


def to_scan_grid(cube_map: torch.Tensor, geometry: ScanGeometry, slab_voxels: int = 1 << 22) -> np.ndarray:
    """A map on the model's cube (S, S, S) resampled onto the scan's grid (trilinear, zero outside the cube)."""
    source = cube_map.detach().float().cpu()[None, None]
    to_grid = torch.from_numpy(scan_to_cube_coordinates(geometry)[:3]).float()  # (3, 4)
    nx, ny, nz = geometry.shape
    plane = (torch.arange(ny, dtype=torch.float32)[:, None, None] * to_grid[:, 1]
             + torch.arange(nz, dtype=torch.float32)[None, :, None] * to_grid[:, 2] + to_grid[:, 3])  # (ny, nz, 3)
    out = np.zeros(geometry.shape, dtype=np.float32)
    step = max(1, slab_voxels // (ny * nz))
    for start in range(0, nx, step):  # slabs along the first axis bound the memory
        first = torch.arange(start, min(nx, start + step), dtype=torch.float32)
        grid = first[:, None, None, None] * to_grid[:, 0] + plane
        sampled = F.grid_sample(source, grid[None], mode="bilinear", padding_mode="zeros", align_corners=False)
        out[start:start + len(first)] = sampled[0, 0].numpy()
    return out


def relevance_nifti(scan_map: np.ndarray, geometry: ScanGeometry) -> nib.Nifti1Image:
    """The map as a float32 NIfTI with the scan's affine (as sform and qform, in mm)."""
    image = nib.Nifti1Image(np.asarray(scan_map, dtype=np.float32), geometry.affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_sform(geometry.affine, code=1)
    image.set_qform(geometry.affine, code=1)
    image.header["descrip"] = b"lavis-medblip relevance map"
    return image


# ---- atlas regions ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def cerebra_region_names() -> dict[int, str]:
    """CerebrA label id -> region name, e.g. 48 -> "Right Hippocampus" (from the vendored label table)."""
    names = {}
    with open(CEREBRA_LABEL_TABLE, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            name = row["Label Name"].strip()
            names[int(row["RH Label"])] = f"Right {name}"
            names[int(row["LH Labels"])] = f"Left {name}"
    return names


@functools.lru_cache(maxsize=1)
def _cerebra() -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(CEREBRA_LABELS))
    return np.asarray(image.dataobj).astype(np.int64), image.affine


@functools.lru_cache(maxsize=8)
def _atlas_on_cube(affine_bytes: bytes, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each labelled atlas voxel inside the cube: the cube voxel it falls in (flat), its label and weight."""
    cube_affine = np.frombuffer(affine_bytes).reshape(4, 4)
    labels, atlas_affine = _cerebra()
    ijk = np.nonzero(labels)
    to_cube = np.linalg.inv(cube_affine) @ atlas_affine
    index = np.rint(np.stack(ijk, axis=1) @ to_cube[:3, :3].T + to_cube[:3, 3]).astype(np.int64)
    inside = np.all((index >= 0) & (index < size), axis=1)
    flat = np.ravel_multi_index(tuple(index[inside].T), (size,) * 3)
    # one atlas voxel is this much of a cube voxel; a cube voxel never counts more than whole
    expected = abs(np.linalg.det(cube_affine[:3, :3])) / abs(np.linalg.det(atlas_affine[:3, :3]))
    per_voxel = np.bincount(flat, minlength=size**3)
    weight = 1.0 / np.maximum(per_voxel[flat], expected)
    return flat, labels[ijk][inside], weight


def region_shares(cube_map: torch.Tensor | np.ndarray, cube_affine: np.ndarray) -> dict[str, float]:
    """Share of the map's mass in each CerebrA region (cube voxels weighted by how much of them it covers),
    for a cube whose voxels ``cube_affine`` maps to MNI mm; regions without relevance are left out."""
    values = np.asarray(torch.as_tensor(cube_map).detach().cpu().double().numpy())
    total = float(values.sum())
    if total <= 0:
        return {}
    flat, labels, weight = _atlas_on_cube(np.ascontiguousarray(cube_affine, dtype=np.float64).tobytes(), values.shape[0])
    mass = np.bincount(labels, weights=values.reshape(-1)[flat] * weight) / total
    names = cerebra_region_names()
    return {names[int(label)]: float(mass[label]) for label in np.nonzero(mass > 0)[0] if int(label) in names}


def top_regions(shares: dict[str, float], count: int = TOP_REGIONS) -> list[tuple[str, float]]:
    """The ``count`` largest shares, largest first (ties by name)."""
    return sorted(shares.items(), key=lambda item: (-item[1], item[0]))[:count]


def format_regions(regions: Sequence[tuple[str, float]]) -> str:
    """``"Left Hippocampus 0.121; Right Lateral Ventricle 0.080"``: the results CSV's ``top_regions`` column."""
    return "; ".join(f"{name} {share:.3f}" for name, share in regions)


def relevance_path(directory: str | Path, case_id: str, make_folders: bool = False) -> Path:
    """``directory/<id>_relevance.nii.gz``, the id without its volume suffix; folders in the id are kept, but
    none may climb out of ``directory``."""
    parts = [part for part in scan_name(case_id).replace("\\", "/").split("/") if part not in ("", ".", "..")]
    path = Path(directory).joinpath(*parts[:-1], f"{parts[-1] if parts else 'scan'}_relevance.nii.gz")
    if make_folders:
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def atlas_affine_of(geometry: ScanGeometry) -> np.ndarray:
    """The cube's voxels -> MNI mm: template space when registered, else the scan's world taken as MNI."""
    return geometry.cube_affine


# ---- the entry point --------------------------------------------------------------------------------------


def explain_scan(predictor: Predictor, scan_path: str | Path, text: str, method: str = "gradient",
                 answer: str | None = None, prediction: Prediction | None = None) -> ScanRelevance:
    """Diagnose one scan and map the relevance of an answer (default: the predicted one) onto its grid.

    ``prediction``: the scan's diagnosis when the caller already has it (not predicted again).

    ``predictor`` is the predict CLI's (:class:`~lavis_medblip.inference.Predictor`): its model, processors,
    classes and question. ``method`` is ``gradient`` or ``attention`` (:mod:`lavis_medblip.models.explain`).
    Raises ``VolumeReadError`` for an unreadable scan and ``ValueError`` for a model without images or an
    unknown method.
    """
    from lavis_medblip.models.explain import METHODS

    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown relevance method {method!r}; choose from {list(METHODS)}")
    model = predictor.model
    if not model.config.uses_image:
        raise ValueError(f"this model's prompt has no image (prompt_order {list(model.config.prompt_order)}), "
                         "so it has no relevance map")
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = time.perf_counter() - start - sum(timings.values())

    cube, geometry, warning = read_scan(predictor.volume_processor, scan_path)
    lap("read")
    if prediction is None:
        (prediction,) = predictor.predict([cube], [text])
    lap("predict")
    answer = prediction.answer if answer is None else answer
    samples = predictor.samples([cube], [text], predictor.question)
    cube_map = model.explain(samples, answer=answer, method=method)[0].cpu()
    lap("relevance")
    shares = region_shares(cube_map, atlas_affine_of(geometry))
    image = relevance_nifti(to_scan_grid(cube_map, geometry), geometry)
    lap("mapping")
    return ScanRelevance(image=image, model_space=cube_map, top_regions=top_regions(shares), answer=answer,
                         method=method, seconds=time.perf_counter() - start, prediction=prediction,
                         warning=warning, region_shares=shares, timings=timings)
