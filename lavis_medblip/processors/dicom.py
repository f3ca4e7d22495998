"""DICOM through pydicom: a series folder, or one multi-frame file, as one :class:`Volume`.
Also what a DICOM file is (suffix, or the ``DICM`` marker at byte 128 since scanner exports often
have no suffix) and what a DICOM-series folder is, for finding scans.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from lavis_medblip.processors.volume_types import Volume, VolumeReader, VolumeReadError

#: DICOM Part 10 files carry "DICM" here, after a 128-byte preamble.
DICOM_MAGIC_OFFSET = 128


# DICOM geometry lives in the patient's LPS frame; Volume affines are RAS (as in NIfTI).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class _DicomFrame:
    """One 2D image of a DICOM series (a classic file, or one frame of a multi-frame file)."""

    pixels: np.ndarray  # rows x columns, rescaled when the file asks for it
    position: Optional[np.ndarray]  # ImagePositionPatient: LPS mm of the first pixel's centre
    orientation: Optional[np.ndarray]  # ImageOrientationPatient: row, then column direction cosines
    pixel_spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns) in mm
    thickness: float
    order: tuple[int, int]  # (InstanceNumber, frame index): the order when geometry is missing


def _frame_attribute(dataset: Any, frame_index: int, macro: str, keyword: str, default: Any = None) -> Any:
    """``keyword`` for one frame: from its functional-group ``macro``, else the top level, else ``default``.

    Enhanced (multi-frame) objects keep per-frame geometry in functional-group macros, each either
    per frame (PerFrameFunctionalGroupsSequence) or once for all frames (SharedFunctionalGroupsSequence);
    the standard allows both places, and the per-frame one wins. Classic files have top-level attributes.
    """
    for groups_keyword, index in (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0)):
        groups = dataset.get(groups_keyword)
        if groups is None or index >= len(groups):
            continue
        items = groups[index].get(macro)
        if items and items[0].get(keyword) not in (None, ""):
            return items[0].get(keyword)
    value = dataset.get(keyword)
    return default if value in (None, "") else value


def _dicom_frames(file: Path, dataset: Any) -> list[_DicomFrame]:
    """Every frame of one DICOM image file, with its geometry and rescaled pixels."""
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise VolumeReadError(file, f"colour DICOM (SamplesPerPixel={samples}) is not a grey-scale MR image")
    n_frames = int(dataset.get("NumberOfFrames", 1) or 1)
    pixels = dataset.pixel_array
    if n_frames == 1:
        pixels = pixels[None]
    instance = int(dataset.get("InstanceNumber", 0) or 0)
    frames = []
    for index in range(n_frames):
        position = _frame_attribute(dataset, index, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _frame_attribute(dataset, index, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _frame_attribute(dataset, index, "PixelMeasuresSequence", "PixelSpacing", [1.0, 1.0])
        thickness = _frame_attribute(dataset, index, "PixelMeasuresSequence", "SliceThickness", 1.0)
        slope = float(_frame_attribute(dataset, index, "PixelValueTransformationSequence", "RescaleSlope", 1))
        intercept = float(_frame_attribute(dataset, index, "PixelValueTransformationSequence", "RescaleIntercept", 0))
        array = pixels[index]
        if slope != 1 or intercept != 0:
            array = array.astype(np.float32) * slope + intercept
        frames.append(
            _DicomFrame(
                pixels=array,
                position=None if position is None else np.asarray(position, dtype=np.float64),
                orientation=None if orientation is None else np.asarray(orientation, dtype=np.float64),
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                thickness=float(thickness),
                order=(instance, index),
            )
        )
    return frames


def _series_summary(uid: str, images: list[tuple[Path, Any]]) -> tuple[int, str]:
    """(image count, "UID (description, N images)") of one series, for error messages."""
    count = sum(int(dataset.get("NumberOfFrames", 1) or 1) for _, dataset in images)
    description = str(images[0][1].get("SeriesDescription", "") or "no description")
    return count, f"{uid or '<no SeriesInstanceUID>'} ({description}, {count} images)"


class DicomSeriesReader(VolumeReader):
    """DICOM through pydicom: a directory holding one series, or one multi-frame file.

    * A directory of classic files (one slice each) or of multi-frame files (Enhanced MR:
      ``NumberOfFrames`` > 1), or a single ``.dcm``/``.dicom`` file. Every frame of every image
      file in the series becomes one slice; non-DICOM files in a directory are skipped.
    * Geometry per frame: ImagePositionPatient, ImageOrientationPatient, PixelSpacing and
      SliceThickness, taken from the frame's functional groups (PlanePositionSequence,
      PlaneOrientationSequence, PixelMeasuresSequence; per-frame before shared) or, for classic
      files, from the top level. RescaleSlope/Intercept likewise (PixelValueTransformationSequence).
    * Slices are ordered by their position along the slice normal (the cross product of the row
      and column direction cosines), falling back to (InstanceNumber, frame index) when geometry
      is missing. The affine is built in DICOM's LPS frame and converted to RAS.
    * A directory holding more than one series (different SeriesInstanceUID) is an error that
      names the directory and lists each series (UID, description, image count). No series is
      picked for you: a study export mixes localizers, T1, FLAIR and DWI, and "the series with the
      most slices" may well be the DWI, which would then be trained on silently as the T1.
      Keep one series per directory.
    * Slices with different orientations (a three-plane localizer) or sharing a position
      (several echoes or time points) are errors too: they do not form one 3D volume.
    """

    suffixes = (".dcm", ".dicom", ".ima")  # .ima: Siemens exports

    def verify_suffix(self, path: Union[str, os.PathLike]) -> bool:
        return Path(path).is_dir() or super().verify_suffix(path)

    def describe(self) -> str:
        return f"{type(self).__name__} (a directory of DICOM files, or a {'/'.join(self.suffixes)} file)"

    def read(self, path: Union[str, os.PathLike]) -> Volume:
        try:
            import pydicom
            from pydicom.errors import InvalidDicomError
        except ImportError as exc:  # pydicom is an optional extra: pip install lavis-medblip[dicom]
            raise VolumeReadError(path, "reading DICOM needs pydicom (pip install pydicom)") from exc

        path = Path(path)
        files = [path] if path.is_file() else sorted(entry for entry in path.iterdir() if entry.is_file())
        images = []
        for file in files:
            try:
                dataset = pydicom.dcmread(file)
            except InvalidDicomError:
                if file == path:
                    raise VolumeReadError(path, "not a DICOM file (no DICM preamble)") from None
                continue  # DICOMDIR-adjacent junk (README, .DS_Store) is common in exports
            if "PixelData" in dataset:
                images.append((file, dataset))
        if not images:
            where = "in this directory" if path.is_dir() else "(the file holds no pixel data)"
            raise VolumeReadError(path, f"no DICOM image files {where}")

        images = self._one_series(path, images)
        self._check_claim(path, images)
        frames = [frame for file, dataset in images for frame in _dicom_frames(file, dataset)]
        if len({frame.pixels.shape for frame in frames}) > 1:
            raise VolumeReadError(path, "DICOM slices have different sizes")
        frames, affine_lps = self._sort_and_affine(path, frames)
        # A frame is (rows, columns); array axis 0 must follow the row direction cosine
        # (along a row = across columns), so each frame goes in transposed: (columns, rows).
        data = np.stack([frame.pixels.T for frame in frames], axis=-1)
        return Volume(data=data, affine=_LPS_TO_RAS @ affine_lps, source=str(path))

    def _check_claim(self, path: Path, images: list[tuple[Path, Any]]) -> None:
        """Columns x rows x frames against the limits, before any pixel data is decoded.

        The largest rows and columns of any image bound the total when slice sizes differ (an error later).
        """
        datasets = [dataset for _, dataset in images]
        bits = int(datasets[0].get("BitsAllocated", 16) or 16)
        signed = int(datasets[0].get("PixelRepresentation", 0) or 0)
        shape = (
            max(int(dataset.get("Columns", 0) or 0) for dataset in datasets),
            max(int(dataset.get("Rows", 0) or 0) for dataset in datasets),
            sum(int(dataset.get("NumberOfFrames", 1) or 1) for dataset in datasets),
        )
        self.limits.check_claim(path, shape, np.dtype(f"{'i' if signed else 'u'}{max(1, bits // 8)}"))

    @staticmethod
    def _one_series(path: Path, images: list[tuple[Path, Any]]) -> list[tuple[Path, Any]]:
        """The images of the only series in ``images``; several series raise, listing them."""
        by_series: dict[str, list[tuple[Path, Any]]] = {}
        for file, dataset in images:
            by_series.setdefault(str(dataset.get("SeriesInstanceUID", "")), []).append((file, dataset))
        if len(by_series) == 1:
            return images
        listing = sorted((_series_summary(uid, members) for uid, members in by_series.items()), reverse=True)
        raise VolumeReadError(
            path,
            f"directory holds {len(by_series)} DICOM series, expected one (keep one series per directory): "
            + "; ".join(text for _, text in listing),
        )

    @staticmethod
    def _sort_and_affine(path: Path, frames: list[_DicomFrame]) -> tuple[list[_DicomFrame], np.ndarray]:
        first = frames[0]
        row_spacing, column_spacing = first.pixel_spacing
        has_geometry = all(frame.position is not None and frame.orientation is not None for frame in frames)
        if has_geometry:
            orientations = np.stack([frame.orientation for frame in frames])
            if not np.allclose(orientations, first.orientation, atol=1e-4):
                raise VolumeReadError(
                    path, "DICOM slices have different orientations (a localizer?); not a 3D series"
                )
            row_cosine, column_cosine = first.orientation[:3], first.orientation[3:]
            normal = np.cross(row_cosine, column_cosine)
            positions = np.stack([frame.position for frame in frames])
            order = np.argsort(positions @ normal, kind="stable")
        else:
            row_cosine, column_cosine, normal = np.eye(3)
            order = sorted(range(len(frames)), key=lambda i: frames[i].order)
            positions = None
        frames = [frames[i] for i in order]

        affine = np.eye(4)
        affine[:3, 0] = row_cosine * column_spacing  # moving along a row steps across columns
        affine[:3, 1] = column_cosine * row_spacing
        affine[:3, 2] = normal * first.thickness
        if positions is not None:
            positions = positions[order]
            affine[:3, 3] = positions[0]
            if len(frames) > 1:
                steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
                if np.any(steps < 1e-4):
                    raise VolumeReadError(
                        path, "two DICOM slices share a position (several echoes or time points?); not a 3D series"
                    )
                affine[:3, 2] = (positions[-1] - positions[0]) / (len(frames) - 1)
        return frames, affine


def is_dicom_file(path: Path) -> bool:
    """A DICOM slice: a DICOM suffix, or the ``DICM`` marker (a ``DICOMDIR`` index is no slice)."""
    if path.name.upper() == "DICOMDIR":
        return False
    if DicomSeriesReader().verify_suffix(path) and not path.is_dir():
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_series(folder: Path) -> bool:
    """A folder that directly holds at least one DICOM file (names starting with "." aside)."""
    try:
        entries = list(folder.iterdir())
    except OSError:  # whoever searches the folder reports it
        return False
    return any(entry.is_file() and not entry.name.startswith(".") and is_dicom_file(entry) for entry in entries)
