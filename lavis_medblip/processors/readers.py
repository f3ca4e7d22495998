"""Volume readers: one per file format behind a common interface (``verify_suffix``, ``read``).

NIfTI and MGH/MGZ through nibabel, M3D's ``.npy`` (1 x D x H x W in [0, 1]) through numpy, and DICOM
(a series directory, or a multi-frame file) through pydicom. :func:`load_volume` tries them in turn; an
error names the file and the readers tried. :class:`Volume` (data + affine) is what readers return and
transforms take.

Every reader checks what a file's header claims (shape x item size) against :class:`VolumeLimits`
and against the file's size *before* allocating anything, so a 352-byte header claiming 1500^3
float32 fails at once with a :class:`VolumeReadError` instead of allocating 13.5 GB.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

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


class DegenerateVolumeWarning(UserWarning):
    """The volume was read but is unlikely to be a usable scan (constant, mostly NaN/Inf, ...).

    Predict puts the message in its ``warning`` column; evaluation counts these per split.
    """


class ConstantVolumeWarning(DegenerateVolumeWarning):
    """The volume has a single intensity; the processor returns zeros."""


class NonFiniteVolumeWarning(DegenerateVolumeWarning):
    """More than ``non_finite_warning_fraction`` of the voxels are NaN or infinite."""


@contextlib.contextmanager
def degenerate_volume_warnings() -> Iterator[list[str]]:
    """Collect the messages of the :class:`DegenerateVolumeWarning` s raised in the block (into the
    yielded list, when the block ends); other warnings pass on as usual."""
    messages: list[str] = []
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DegenerateVolumeWarning)  # a repeat from the same line is another scan
            yield messages
    finally:
        for warning in caught:
            if issubclass(warning.category, DegenerateVolumeWarning):
                messages.append(str(warning.message))
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def degenerate_warning_class(name: str) -> type[DegenerateVolumeWarning]:
    """The :class:`DegenerateVolumeWarning` subclass called ``name`` (the base class if none is)."""
    pending = [DegenerateVolumeWarning]
    while pending:
        category = pending.pop()
        if category.__name__ == name:
            return category
        pending.extend(category.__subclasses__())
    return DegenerateVolumeWarning


@dataclass(frozen=True)
class DegenerateVolumeNote:
    """A :class:`DegenerateVolumeWarning` a transform emitted, kept so a cache hit can emit it again.

    ``problem`` leaves out the file name: a cache entry is shared by every file with the same content.
    """

    category: type[DegenerateVolumeWarning]
    problem: str

    def warn(self, source: str) -> None:
        warnings.warn(f"{source}: {self.problem}", self.category, stacklevel=2)

    def as_record(self) -> dict[str, str]:
        return {"category": self.category.__name__, "problem": self.problem}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "DegenerateVolumeNote":
        return cls(degenerate_warning_class(str(record["category"])), str(record["problem"]))


@dataclass(frozen=True)
class VolumeLimits:
    """What a volume may be: checked on its header before reading, and on its shape after.

    The volume processors take these from their YAML keys of the same names; the defaults live here only.
    """

    # 2**28 voxels (e.g. 512 x 512 x 1024): twice a 512^3 high-resolution scan, 16x a 1 mm 256^3 head.
    max_voxels: int = 2**28
    # 2 GiB of stored data: 2**28 voxels of float64. (A header that asks for scaling makes the array
    # in memory larger, e.g. uint8 -> float32; the working copies are bounded by max_voxels.)
    max_bytes: int = 2**31
    # Along each spatial axis. A real brain acquisition has at least ~20 slices even at 5 mm (2D
    # thick-slice series) and more voxels in-plane; fewer than 16 holds no anatomy worth upsampling
    # to the model's grid (a 2 x 2 x 2 array is a bug, not a scan).
    min_axis_size: int = 16
    # Above this fraction of NaN/Inf voxels a NonFiniteVolumeWarning (a DegenerateVolumeWarning) is emitted.
    non_finite_warning_fraction: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_voxels", "max_bytes", "min_axis_size"):
            value = getattr(self, name)
            whole = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not whole or value < 1 or value != int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        fraction = float(self.non_finite_warning_fraction)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"non_finite_warning_fraction must be between 0 and 1, got {fraction!r}")
        object.__setattr__(self, "non_finite_warning_fraction", fraction)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "VolumeLimits":
        """The limits a processor config sets; keys it leaves out keep their defaults."""
        return cls(**{item.name: cfg[item.name] for item in fields(cls) if item.name in cfg})

    def check_claim(self, source: Any, shape: Sequence[int], dtype: Any) -> int:
        """Raise if ``shape`` x ``dtype`` exceeds ``max_voxels`` or ``max_bytes``; return the data's bytes."""
        voxels = math.prod(int(n) for n in shape)
        data_bytes = voxels * np.dtype(dtype).itemsize
        if voxels > self.max_voxels:
            raise VolumeReadError(source, f"{describe_claim(shape, dtype)} is {voxels:,} voxels, more than the "
                                          f"limit max_voxels={self.max_voxels:,}")
        if data_bytes > self.max_bytes:
            raise VolumeReadError(source, f"{describe_claim(shape, dtype)} is {data_bytes:,} bytes, more than the "
                                          f"limit max_bytes={self.max_bytes:,}")
        return data_bytes


def describe_claim(shape: Sequence[int], dtype: Any) -> str:
    """ "header claims 1500 x 1500 x 1500 float32 (13.5 GB)", for error messages."""
    data_bytes = math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize
    size = next((f"{data_bytes / scale:.3g} {unit}" for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
                 if data_bytes >= scale), f"{data_bytes} bytes")
    return f"header claims {' x '.join(str(int(n)) for n in shape)} {np.dtype(dtype).name} ({size})"


# Deflate (gzip: .nii.gz, .mgz) expands at most 1032:1 (a 258-byte match coded in two bits), so a
# compressed file of n bytes holds at most 1032 n: a bound no valid file exceeds. The gzip ISIZE
# trailer would be tighter but is only a hint: modulo 2**32, per member, and as forgeable as the header.
MAX_DEFLATE_RATIO = 1032
_GZIP_MAGIC = b"\x1f\x8b"


def check_claim_fits_file(path: Union[str, os.PathLike], shape: Sequence[int], dtype: Any, data_offset: int,
                          limits: VolumeLimits) -> None:
    """Raise before reading if the header's claim exceeds ``limits`` or more than the file can hold.

    ``data_offset`` is where the data starts in the (uncompressed) stream.
    """
    needed = data_offset + limits.check_claim(path, shape, dtype)
    file_bytes = os.path.getsize(path)
    with open(path, "rb") as handle:
        compressed = handle.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
    if compressed and needed > file_bytes * MAX_DEFLATE_RATIO:
        raise VolumeReadError(path, f"{describe_claim(shape, dtype)} from byte {data_offset}, but {file_bytes:,} "
                                    f"gzip bytes hold at most {file_bytes * MAX_DEFLATE_RATIO:,} (deflate expands "
                                    f"at most {MAX_DEFLATE_RATIO}:1): a truncated or header-only file")
    if not compressed and needed > file_bytes:
        raise VolumeReadError(path, f"{describe_claim(shape, dtype)} from byte {data_offset}, but the file has "
                                    f"only {file_bytes:,} bytes: a truncated or header-only file")


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
    # The DegenerateVolumeWarnings emitted on the way, for the cache to store with its entry.
    notes: tuple[DegenerateVolumeNote, ...] = ()

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis, from the affine's column norms."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


class VolumeReader:
    """Interface: ``verify_suffix(path)`` says whether this reader handles the path; ``read`` loads it.

    ``limits`` bound what ``read`` may allocate; :meth:`with_limits` gives a copy with others.
    """

    suffixes: tuple[str, ...] = ()
    limits: VolumeLimits = VolumeLimits()

    def with_limits(self, limits: VolumeLimits) -> "VolumeReader":
        reader = copy.copy(self)
        reader.limits = limits
        return reader

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

    suffixes = (".dcm", ".dicom")

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
