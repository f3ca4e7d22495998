"""On-disk cache of preprocessed (deterministic, eval-time) MRI volumes, one entry per (input
content, processor settings), which DataLoader workers, processes and ranks may share.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch

from lavis_medblip.annotations.hashing import content_sha256
from lavis_medblip.processors.volume_types import DegenerateVolumeNote, Volume
from lavis_medblip.storage import ArrayStore

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

    ``get_or_build(path, build)`` returns the stored array; ``build()`` (a :class:`Volume` whose
    data is a float tensor in [0, 1]) runs only on a miss. On a miss the encoded array is returned,
    so a first and a second call decode to identical tensors; a hit emits the warnings of
    ``volume.notes`` again. ``hits``/``misses`` count lookups.

    An entry is ``<key>.npy``, the array, and ``<key>.json``, the ``DegenerateVolumeWarning``
    warnings its build emitted, in an :class:`~lavis_medblip.storage.ArrayStore` (each file written
    whole, then renamed into place). The ``.json`` goes first, so a visible ``.npy`` always has its
    ``.json``. Any number of DataLoader workers, ``warm_cache`` processes and ranks may therefore
    share one cache directory: a reader sees no entry or a complete one, never a partial file under
    a final name, and concurrent writers of an entry write identical bytes. An entry without its
    ``.json`` (written by an older version) or with a damaged file is rebuilt.
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
        self.store = ArrayStore(cache_dir)
        self.storage_dtype = storage_dtype
        # The storage dtype changes the stored bytes, so it is part of the key.
        self.settings = {**dict(settings), "cache_storage_dtype": storage_dtype}
        self.settings_key = settings_sha256(self.settings)
        self.hits = 0
        self.misses = 0

    @property
    def cache_dir(self) -> Path:
        return self.store.root

    def entry_key(self, source: PathLike) -> str:
        return hashlib.sha256(f"{content_sha256(source)}:{self.settings_key}".encode()).hexdigest()

    def entry_path(self, source: PathLike) -> Path:
        """The ``.npy`` of ``source``'s entry (its ``.json`` sits beside it)."""
        return self.store.path(self.entry_key(source))

    def get_or_build(self, source: PathLike, build: Callable[[], Volume]) -> np.ndarray:
        """The stored array of ``source`` (memory-mapped), or ``build()``'s, encoded and stored, on a miss."""
        key = self.entry_key(source)
        stored = self.store.load(key)
        notes = None if stored is None else self._load_notes(key)
        if notes is not None:
            self.hits += 1
            for note in notes:
                note.warn(str(source))
            return stored
        self.misses += 1
        volume = build()  # emits its warnings itself
        array = encode(volume.data, self.storage_dtype)
        try:
            # The notes first: whoever sees the .npy must find them.
            self.store.save_json(key, {"degenerate_warnings": [note.as_record() for note in volume.notes]})
            self.store.save(key, array)
        except OSError as exc:
            # A full or read-only cache disk must not stop training: serve the result uncached.
            logger.warning("Could not write cache entry %s (%s); continuing without caching it",
                           self.store.path(key), exc)
        return array

    def _load_notes(self, key: str) -> Optional[list[DegenerateVolumeNote]]:
        path = self.store.path(key, ".json")
        try:
            return [DegenerateVolumeNote.from_record(record) for record in self.store.load_json(key)["degenerate_warnings"]]
        except FileNotFoundError:
            logger.info("Cache entry %s has no %s (written by an older version, or copied without it); rebuilding it",
                        self.store.path(key), path.name)
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("Ignoring unreadable cache entry %s (%s: %s); rebuilding it", path, type(exc).__name__, exc)
            return None


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
