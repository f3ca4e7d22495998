"""Content hashes of input files: the key of the preprocessed-volume cache, and the provenance in reports.
Standard library only, so data-preparation scripts can use it without importing torch or LAVIS.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]

_HASH_CHUNK_BYTES = 1 << 22
# (resolved path, size, mtime_ns, ctime_ns, inode) -> sha256 hex. Hashing a large file costs
# ~10 ms per 30 MB; the stat fields change whenever the file is rewritten or replaced.
_content_hash_memo: dict[tuple, str] = {}
_memo_lock = threading.Lock()


def _file_sha256(path: Path, digest: "hashlib._Hash") -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)


def _stat_key(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def content_sha256(path: PathLike) -> str:
    """sha256 of a file's bytes, or of a directory's regular files (names and bytes, sorted).

    A DICOM series is a directory, so its key covers every file in it. Memoised per process on
    each file's (path, size, mtime_ns, ctime_ns, inode).
    """
    path = Path(path).resolve()
    if path.is_dir():
        files = sorted(entry for entry in path.iterdir() if entry.is_file())
        stats = tuple((entry.name, *_stat_key(entry.stat())) for entry in files)
        memo_key = (str(path), stats)
    else:
        stat = path.stat()
        files = [path]
        memo_key = (str(path), *_stat_key(stat))
    with _memo_lock:
        cached = _content_hash_memo.get(memo_key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    if path.is_dir():
        for entry in files:
            # The name goes in too: renaming slices can change their order in a series.
            digest.update(entry.name.encode("utf-8") + b"\0")
            _file_sha256(entry, digest)
    else:
        _file_sha256(path, digest)
    value = digest.hexdigest()
    with _memo_lock:
        _content_hash_memo[memo_key] = value
    return value
