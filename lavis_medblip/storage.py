"""Files that appear whole or not at all, and arrays stored by key: every file the package writes
(checkpoints through :func:`atomic_save`, the predict CLI's results file, the caches' entries
through :class:`ArrayStore`) goes through :func:`atomic_file`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it: once per process
    os.umask(umask)
    return umask


def new_file_mode(path: Path) -> int:
    """The permissions ``open(path, "w")`` would leave: the existing file's, else 0o666 less the umask."""
    with contextlib.suppress(FileNotFoundError):
        return stat.S_IMODE(path.stat().st_mode)
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "wb", durable: bool = True, **open_kwargs: Any) -> Iterator[IO]:
    """A file handle whose content replaces ``path`` when the block succeeds; if it fails ``path`` is untouched.

    It writes a temporary file beside the target (``mkstemp``: a unique name per process and thread)
    and renames it over the target with ``os.replace``, atomic on POSIX and Windows. A failure, or a
    kill, leaves the previous file as it was; the temporary file is removed whenever the writing
    process survives.

    Args:
        mode: ``"wb"`` or ``"w"`` (then pass ``encoding``/``newline`` as to ``open``).
        durable: ``fsync`` before the rename, so the name never points at data still in flight
            (caches, which can be rebuilt, skip it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=path.parent)
    try:
        with open(descriptor, mode, **open_kwargs) as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(temporary, new_file_mode(path))  # mkstemp makes it 0o600
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def atomic_save(state: Any, path: PathLike) -> None:
    """``torch.save`` through :func:`atomic_file`: a killed run never leaves a half-written checkpoint."""
    with atomic_file(path) as handle:
        torch.save(state, handle)


class ArrayStore:
    """``.npy`` arrays and JSON sidecars by key under ``root`` (fanned out by the key's first two characters).

    A missing entry reads as ``None``; a damaged one (a disk that filled up, an empty file) is
    logged and reads as ``None`` too, so that the caller rebuilds it. Entries are written through
    :func:`atomic_file`: any number of processes may share one root, and a reader sees no entry or
    a complete one.
    """

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root).expanduser()

    def path(self, key: str, suffix: str = ".npy") -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

    def load(self, key: str) -> Optional[np.ndarray]:
        path = self.path(key)
        try:
            # "c" = copy-on-write: the pages come from the OS page cache (shared by all workers)
            # and a tensor built on them is writable without ever changing the file.
            return np.load(path, mmap_mode="c", allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
            logger.warning("Ignoring unreadable cache entry %s (%s); rebuilding it", path, exc)
            return None

    def save(self, key: str, array: np.ndarray) -> None:
        with atomic_file(self.path(key), durable=False) as handle:
            np.save(handle, array, allow_pickle=False)

    def load_json(self, key: str) -> Any:
        """The sidecar's value; ``FileNotFoundError`` when there is none, ``ValueError`` when it is damaged."""
        text = self.path(key, ".json").read_text(encoding="utf-8")
        return json.loads(text)

    def save_json(self, key: str, value: Any) -> None:
        with atomic_file(self.path(key, ".json"), "w", durable=False, encoding="utf-8") as handle:
            json.dump(value, handle)
