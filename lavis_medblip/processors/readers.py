"""Volume readers: one per file format behind a common interface (``verify_suffix``, ``read``).

NIfTI and MGH/MGZ through nibabel, M3D's ``.npy`` (1 x D x H x W in [0, 1]) through numpy, and a
DICOM series directory through pydicom. :func:`load_volume` tries them in turn; an error names the
file and the readers tried. :class:`Volume` (data + affine) is what readers return and transforms take.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import nibabel as nib
import numpy as np
import torch

logger = logging.getLogger(__name__)


class VolumeReadError(ValueError):
    """A volume could not be read or preprocessed. ``source`` names the file, ``problem`` says why."""

    def __init__(self, source: Any, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class VolumeTransformError(VolumeReadError):
    """A transform failed unexpectedly; ``transform`` names it and ``__cause__`` is the original error."""

    def __init__(self, source: Any, transform: str, cause: BaseException) -> None:
        self.transform = transform
        super().__init__(source, f"transform {transform} failed: {type(cause).__name__}: {cause}")


class ConstantVolumeWarning(UserWarning):
    """The volume has a single intensity; the processor returns zeros."""


@dataclass
class Volume:
    """A 3D image travelling through the pipeline.

    ``data`` is a numpy array until :class:`ScaleIntensityPercentiles` turns it into a float32
    torch tensor; ``affine`` maps voxel indices to RAS+ millimetres (as in NIfTI).
    """

    data: Union[np.ndarray, torch.Tensor]
    affine: np.ndarray
    source: str
    # True when intensities are already in [0, 1] (M3D .npy): skip percentile scaling.
    intensity_normalized: bool = False
    # True for arrays that may carry a leading channel axis (1 x D x H x W): .npy and in-memory input.
    channel_first: bool = False

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis, from the affine's column norms."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


class VolumeReader:
    """Interface: ``verify_suffix(path)`` says whether this reader handles the path; ``read`` loads it."""

    suffixes: tuple[str, ...] = ()

    def verify_suffix(self, path: Union[str, os.PathLike]) -> bool:
        name = Path(path).name.lower()
        return any(name.endswith(suffix) for suffix in self.suffixes)

    def read(self, path: Union[str, os.PathLike]) -> Volume:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{type(self).__name__} ({', '.join(self.suffixes)})"


class NibabelReader(VolumeReader):
    """NIfTI-1/2 (.nii, .nii.gz) and FreeSurfer MGH/MGZ through nibabel."""

    suffixes = (".nii", ".nii.gz", ".mgh", ".mgz")

    def read(self, path: Union[str, os.PathLike]) -> Volume:
        image = nib.load(os.fspath(path))
        # dataobj keeps the on-disk dtype (uint8/int16) unless the header asks for scaling;
        # get_fdata() would make a float64 copy 4-8x the size.
        data = np.asanyarray(image.dataobj)
        return Volume(data=data, affine=np.asarray(image.affine, dtype=np.float64), source=str(path))


class NumpyReader(VolumeReader):
    """M3D-style ``.npy``: 1 x D x H x W float32 already in [0, 1]; voxel order is taken as-is."""

    suffixes = (".npy",)

    def read(self, path: Union[str, os.PathLike]) -> Volume:
        # allow_pickle=False: a .npy from a shared drive must not be able to run code.
        data = np.load(os.fspath(path), allow_pickle=False)
        normalized = False
        if data.dtype.kind == "f" and data.size:
            finite = data[np.isfinite(data)]
            normalized = bool(finite.size) and float(finite.min()) >= 0.0 and float(finite.max()) <= 1.0
            if not normalized:
                logger.info("%s: float .npy values outside [0, 1]; applying percentile scaling", path)
        return Volume(
            data=data, affine=np.eye(4), source=str(path), intensity_normalized=normalized, channel_first=True
        )


class DicomSeriesReader(VolumeReader):
    """A directory holding one DICOM series (one file per slice), read with pydicom.

    Slices are ordered by their position along the slice normal (ImagePositionPatient projected
    on the cross product of ImageOrientationPatient), falling back to InstanceNumber. The
    affine is built in DICOM's LPS frame and converted to RAS.
    """

    suffixes = ("<directory>",)

    def verify_suffix(self, path: Union[str, os.PathLike]) -> bool:
        return Path(path).is_dir()

    def describe(self) -> str:
        return f"{type(self).__name__} (a directory of DICOM files)"

    def read(self, path: Union[str, os.PathLike]) -> Volume:
        try:
            import pydicom
            from pydicom.errors import InvalidDicomError
        except ImportError as exc:  # pydicom is an optional extra: pip install lavis-medblip[dicom]
            raise VolumeReadError(path, "reading DICOM needs pydicom (pip install pydicom)") from exc

        slices = []
        for file in sorted(entry for entry in Path(path).iterdir() if entry.is_file()):
            try:
                dataset = pydicom.dcmread(file)
            except InvalidDicomError:
                continue  # DICOMDIR-adjacent junk (README, .DS_Store) is common in exports
            if "PixelData" in dataset:
                slices.append(dataset)
        if not slices:
            raise VolumeReadError(path, "no DICOM image files in this directory")
        series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in slices}
        if len(series_uids) > 1:
            raise VolumeReadError(path, f"directory mixes {len(series_uids)} DICOM series; keep one per directory")
        if int(slices[0].get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeReadError(path, "multi-frame (enhanced) DICOM is not supported; convert it to NIfTI")

        slices, affine_lps = self._sort_and_affine(path, slices)
        pixels = []
        for dataset in slices:
            array = dataset.pixel_array
            slope = float(dataset.get("RescaleSlope", 1) or 1)
            intercept = float(dataset.get("RescaleIntercept", 0) or 0)
            if slope != 1 or intercept != 0:
                array = array.astype(np.float32) * slope + intercept
            pixels.append(array)
        if len({array.shape for array in pixels}) > 1:
            raise VolumeReadError(path, "DICOM slices have different sizes")
        # pixel_array is (rows, columns); array axis 0 must follow the row direction cosine
        # (along a row = across columns), so transpose each slice to (columns, rows).
        data = np.stack([array.T for array in pixels], axis=-1)
        lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
        return Volume(data=data, affine=lps_to_ras @ affine_lps, source=str(path))

    @staticmethod
    def _sort_and_affine(path: Union[str, os.PathLike], slices: list) -> tuple[list, np.ndarray]:
        first = slices[0]
        row_spacing, column_spacing = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
        has_geometry = all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in slices)
        if has_geometry:
            cosines = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
            row_cosine, column_cosine = cosines[:3], cosines[3:]
            normal = np.cross(row_cosine, column_cosine)
            positions = np.asarray([ds.ImagePositionPatient for ds in slices], dtype=np.float64)
            order = np.argsort(positions @ normal, kind="stable")
        else:
            row_cosine, column_cosine, normal = np.eye(3)
            order = np.argsort([int(ds.get("InstanceNumber", 0) or 0) for ds in slices], kind="stable")
            positions = None
        slices = [slices[i] for i in order]

        affine = np.eye(4)
        affine[:3, 0] = row_cosine * column_spacing  # moving along a row steps across columns
        affine[:3, 1] = column_cosine * row_spacing
        if positions is not None:
            positions = positions[order]
            affine[:3, 3] = positions[0]
            if len(slices) > 1:
                steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
                if np.any(steps < 1e-4):
                    raise VolumeReadError(
                        path, "two DICOM slices share a position (several echoes or time points?); not a 3D series"
                    )
                affine[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
            else:
                affine[:3, 2] = normal * float(first.get("SliceThickness", 1.0) or 1.0)
        else:
            affine[:3, 2] = normal * float(first.get("SliceThickness", 1.0) or 1.0)
        return slices, affine


DEFAULT_READERS: tuple[VolumeReader, ...] = (NibabelReader(), NumpyReader(), DicomSeriesReader())


def load_volume(path: Union[str, os.PathLike], readers: Sequence[VolumeReader] = DEFAULT_READERS) -> Volume:
    """Read ``path`` with the first reader whose ``verify_suffix`` accepts it.

    Raises :class:`VolumeReadError` naming the file when it is missing, when no reader fits
    (listing the readers tried), or when the chosen reader fails (chaining the cause).
    """
    if not os.path.exists(path):
        raise VolumeReadError(path, "no such file or directory")
    for reader in readers:
        if reader.verify_suffix(path):
            break
    else:
        tried = "; ".join(reader.describe() for reader in readers)
        raise VolumeReadError(path, f"no reader for this file type (tried: {tried})")
    try:
        return reader.read(path)
    except VolumeReadError:
        raise
    except Exception as exc:  # nibabel/pydicom/numpy/zlib raise many types for corrupt files
        raise VolumeReadError(
            path, f"{type(reader).__name__} could not read it: {type(exc).__name__}: {exc}"
        ) from exc
