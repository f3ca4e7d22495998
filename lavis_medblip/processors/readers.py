"""Volume readers, one per file format (``verify_suffix``, ``read``), and what counts as a scan:
NIfTI and MGH/MGZ through nibabel, M3D's ``.npy`` through numpy, DICOM through
:mod:`lavis_medblip.processors.dicom`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence, Union

import nibabel as nib
import numpy as np

from lavis_medblip.processors.dicom import DicomSeriesReader
from lavis_medblip.processors.volume_types import Volume, VolumeReader, VolumeReadError, check_claim_fits_file

logger = logging.getLogger(__name__)


class NibabelReader(VolumeReader):
    """NIfTI-1/2 (.nii, .nii.gz) and FreeSurfer MGH/MGZ through nibabel."""

    suffixes = (".nii", ".nii.gz", ".mgh", ".mgz")

    def read(self, path: Union[str, os.PathLike]) -> Volume:
        image = nib.load(os.fspath(path))  # reads the header only; the data stays on disk
        check_claim_fits_file(path, image.header.get_data_shape(), image.header.get_data_dtype(),
                              int(getattr(image.dataobj, "offset", 0)), self.limits)
        # dataobj keeps the on-disk dtype (uint8/int16) unless the header asks for scaling;
        # get_fdata() would make a float64 copy 4-8x the size.
        data = np.asanyarray(image.dataobj)
        return Volume(data=data, affine=np.asarray(image.affine, dtype=np.float64), source=str(path))


class NumpyReader(VolumeReader):
    """M3D-style ``.npy``: 1 x D x H x W float32 already in [0, 1]; voxel order is taken as-is."""

    suffixes = (".npy",)

    def read(self, path: Union[str, os.PathLike]) -> Volume:
        shape, dtype, data_offset = _npy_header(path)
        check_claim_fits_file(path, shape, dtype, data_offset, self.limits)
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


def _npy_header(path: Union[str, os.PathLike]) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) from a .npy header, reading nothing else."""
    header_readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version not in header_readers:  # 3.0 is only written for structured dtypes with unicode names
            raise VolumeReadError(path, f".npy format {version[0]}.{version[1]} is not a scalar volume "
                                        "(expected 1.0 or 2.0)")
        shape, _, dtype = header_readers[version](handle)
        return shape, dtype, handle.tell()


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



#: Every reader's suffixes, longest first, so that ``.nii.gz`` is stripped whole.
VOLUME_SUFFIXES = tuple(sorted({suffix for reader in DEFAULT_READERS for suffix in reader.suffixes}, key=len, reverse=True))


def has_volume_suffix(path: Union[str, os.PathLike]) -> bool:
    """A file name one of :data:`DEFAULT_READERS` takes (``.nii``, ``.nii.gz``, ``.mgh``, ``.mgz``, ``.npy``, ``.dcm``, ...).

    A scan is such a file or a DICOM-series folder (:func:`~lavis_medblip.processors.dicom.is_dicom_series`).
    """
    return Path(path).name.lower().endswith(VOLUME_SUFFIXES)


def scan_name(name: str) -> str:
    """``name`` without its volume suffix (``sub-01.nii.gz`` -> ``sub-01``)."""
    return next((name[: -len(suffix)] for suffix in VOLUME_SUFFIXES if name.lower().endswith(suffix)), name)
