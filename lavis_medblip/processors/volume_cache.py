"""On-disk cache of preprocessed (deterministic, eval-time) MRI volumes.

One ``.npy`` file per (input content, processor settings). Entries are written to a temporary
file in the cache directory and moved into place with ``os.replace``, which is atomic on POSIX
and Windows, so any number of DataLoader workers and ranks may share one cache directory: a
reader sees either no entry or a complete one, and concurrent writers of the same entry write
identical bytes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import numpy as np
import torch

from lavis_medblip.data.hashing import content_sha256

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Storage dtypes, all holding values in [0, 1]. uint8 is the smallest (quantisation step 1/255);
# float16 keeps ~3 significant digits (step <= 2**-11 near 1); float32 is exact and twice float16's
# size, and a float32 output then maps the entry with no decode pass: the fastest cached path while
# the entries fit in the page cache, the slowest once they must come from disk.
CACHE_STORAGE_DTYPES = {"uint8": np.uint8, "float16": np.float16, "float32": np.float32}


def settings_sha256(settings: Mapping[str, Any]) -> str:
    """Stable hash of the processor settings that change the cached array."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class VolumeCache:
    """Maps an input file (or DICOM directory) to its preprocessed cube, stored compactly.

    ``get_or_build(path, build)`` returns the stored array; ``build()`` (a float tensor in
    [0, 1]) runs only on a miss. On a miss the encoded array is returned, so a first and a
    second call decode to identical tensors. ``hits``/``misses`` count lookups.
    """

    def __init__(
        self,
        cache_dir: PathLike,
        settings: Mapping[str, Any],
        storage_dtype: str = "float16",
    ) -> None:
        if storage_dtype not in CACHE_STORAGE_DTYPES:
            raise ValueError(
                f"cache storage dtype must be one of {sorted(CACHE_STORAGE_DTYPES)}, got {storage_dtype!r}"
            )
        self.cache_dir = Path(cache_dir).expanduser()
        self.storage_dtype = storage_dtype
        # The storage dtype changes the stored bytes, so it is part of the key.
        self.settings = {**dict(settings), "cache_storage_dtype": storage_dtype}
        self.settings_key = settings_sha256(self.settings)
        self.hits = 0
        self.misses = 0

    def entry_path(self, source: PathLike) -> Path:
        key = hashlib.sha256(f"{content_sha256(source)}:{self.settings_key}".encode()).hexdigest()
        # Two-character fan-out keeps directories small for cohorts of 10^5 scans.
        return self.cache_dir / key[:2] / f"{key}.npy"

    def get_or_build(self, source: PathLike, build: Callable[[], torch.Tensor]) -> np.ndarray:
        entry = self.entry_path(source)
        stored = self._try_load(entry)
        if stored is not None:
            self.hits += 1
            return stored
        self.misses += 1
        array = encode(build(), self.storage_dtype)
        try:
            self._atomic_save(entry, array)
        except OSError as exc:
            # A full or read-only cache disk must not stop training: serve the result uncached.
            logger.warning("Could not write cache entry %s (%s); continuing without caching it", entry, exc)
        return array

    def _try_load(self, entry: Path) -> np.ndarray | None:
        try:
            # "c" = copy-on-write: the pages come from the OS page cache (shared by all workers)
            # and a tensor built on them is writable without ever changing the file.
            return np.load(entry, mmap_mode="c", allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            # A damaged entry (e.g. a disk filled up mid-copy elsewhere) is rebuilt, not fatal.
            logger.warning("Ignoring unreadable cache entry %s (%s); rebuilding it", entry, exc)
            return None

    def _atomic_save(self, entry: Path, array: np.ndarray) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as tmp_file:
                np.save(tmp_file, array, allow_pickle=False)
            os.replace(tmp_name, entry)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise


def encode(volume: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """float tensor in [0, 1] -> numpy array of the storage dtype (uint8 holds round(255 x value))."""
    if storage_dtype == "uint8":
        return volume.float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    return volume.to(getattr(torch, storage_dtype)).numpy()


def new_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uninitialised tensor whose memory numpy allocates.

    numpy asks the kernel for transparent huge pages on buffers >= 4 MiB, which roughly halves
    the page-fault cost of filling a fresh 1 x 224^3 volume; torch's own allocator does so only
    with THP_MEM_ALLOC_ENABLE=1. (numpy has no bfloat16, so that one comes from torch.)
    """
    numpy_dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(dtype)
    if numpy_dtype is None:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(shape, dtype=numpy_dtype))


def decode(stored: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored (possibly memory-mapped) array -> tensor of ``dtype`` in [0, 1].

    When ``dtype`` is the storage dtype the tensor shares the copy-on-write memory map: no copy,
    pages are read on first touch, and writing to the tensor never changes the file. Otherwise one
    conversion pass fills a new tensor (plus an in-place scaling pass for uint8).
    """
    source = torch.from_numpy(stored)
    if source.dtype == dtype:
        return source
    # torch's copy_ converts float16 with vectorised F16C instructions (numpy's astype does not),
    # and new_tensor's huge pages make the fresh 1 x S^3 output cheap to fault in; torch.empty or
    # .to(dtype) would take ~3x longer here (4 KiB page faults).
    out = new_tensor(tuple(stored.shape), dtype).copy_(source)
    return out.mul_(1.0 / 255.0) if source.dtype == torch.uint8 else out
