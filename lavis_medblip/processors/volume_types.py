"""What a volume is and what can go wrong with one: :class:`Volume`, the errors and warnings about
volumes, the read limits (:class:`VolumeLimits`) and the interface every reader implements.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np
import torch


class VolumeReadError(ValueError):
    """A volume could not be read or preprocessed. ``source`` names the file, ``problem`` says why."""

    def __init__(self, source: Any, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")

    def __reduce__(self) -> tuple:
        # Picklable whatever the subclass's signature (DataLoader workers send these back).
        return _restore_error, (type(self), str(self), self.__dict__)


def _restore_error(cls: type, message: str, state: dict) -> VolumeReadError:
    error = cls.__new__(cls)
    ValueError.__init__(error, message)
    error.__dict__.update(state)
    return error


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

    Every reader checks what a file's header claims (shape x item size) against these and against
    the file's size *before* allocating anything (:func:`check_claim_fits_file`), so a 352-byte header
    claiming 1500^3 float32 fails at once with a :class:`VolumeReadError` instead of allocating 13.5 GB.
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


@dataclass(frozen=True)
class TemplateAlignment:
    """What :class:`~lavis_medblip.processors.template.RegisterToTemplate` did, kept so that a map on its output
    (template space) can be carried back to the scan: output voxel ``p`` sampled the subject's cube at
    ``theta @ [p, 1]``, both in ``F.affine_grid``'s normalised (x, y, z) = (last, middle, first axis)
    coordinates with ``align_corners=False``; ``subject_affine`` maps that cube's voxels to the scan's world mm.
    """

    theta: np.ndarray  # (3, 4)
    subject_affine: np.ndarray  # (4, 4)


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
    # Set by RegisterToTemplate: then ``affine`` is the template grid's, and this leads back to the scan's world.
    template_alignment: Union[TemplateAlignment, None] = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis, from the affine's column norms."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


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
