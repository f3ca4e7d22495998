"""Preprocessing that gives the same volume whatever the number of threads: a DataLoader worker has one (as when
warm_cache fills the training cache), the main process has all of them."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run long float32 sums on one thread: their rounding depends on how the work is split between threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
