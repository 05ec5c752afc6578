"""Open token memmaps, a bounded number per process: every read of a token or label-mask file goes here.

An `np.memmap` keeps a file descriptor open for as long as it lives (CPython's mmap duplicates the
descriptor it maps), and a prepared Dolma has about 5,500 token files (10,000 in bigger mixes): one
memmap per file kept forever runs out of descriptors (`ulimit -n` is often 1024). This module keeps the
most recently read memmaps open, at most `max_open_memmaps()` of them across every dataset of the
process (a mixture's sources and the held-out groups included), and closes the least recently read one
to open another. Reads return copies, so no caller keeps an evicted memmap (and its descriptor) alive.

The bound: `$MEGAOLMO_MAX_OPEN_MEMMAPS` when set, else 256; never more than a quarter of the soft
RLIMIT_NOFILE, leaving the other descriptors to the data loader, checkpoints, NCCL and the logs.
"""

from __future__ import annotations

import os
import resource
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from megaolmo.errors import DataError

MAX_OPEN_ENV = "MEGAOLMO_MAX_OPEN_MEMMAPS"
DEFAULT_MAX_OPEN = 256
SHARE_OF_FD_LIMIT = 4  # at most 1/4 of the soft descriptor limit goes to memmaps

_open: OrderedDict[tuple[str, str], np.memmap] = OrderedDict()  # least recently read first
_lock = threading.Lock()


def _new_lock_in_child() -> None:
    """A forked child (a DataLoader worker) gets a free lock even if the parent forked while holding it."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def max_open_memmaps() -> int:
    """How many memmaps the process keeps open: the knob (or the default) within the descriptor limit.

    Read on every miss, so a limit lowered after import (or the variable set by a launcher) is honoured.
    """
    raw = os.environ.get(MAX_OPEN_ENV)
    wanted = DEFAULT_MAX_OPEN
    if raw:
        try:
            wanted = int(raw)
        except ValueError:
            raise DataError(f"${MAX_OPEN_ENV}={raw!r} must be a positive integer (open memmaps)") from None
        if wanted < 1:
            raise DataError(f"${MAX_OPEN_ENV}={raw!r} must be a positive integer (open memmaps)")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft // SHARE_OF_FD_LIMIT))


def _memmap(path: Path, dtype: np.dtype) -> np.memmap:
    """The open memmap of `path` read as `dtype`, opened (closing the least recently read) when it is not."""
    key = (os.fspath(path), dtype.str)
    with _lock:
        mapped = _open.get(key)
        if mapped is not None:
            _open.move_to_end(key)
            return mapped
        limit = max_open_memmaps()
        while len(_open) >= limit:
            _open.popitem(last=False)  # the last reference: the mapping and its descriptor close now
        mapped = np.memmap(path, dtype=dtype, mode="r")
        _open[key] = mapped
        return mapped


def read_slice(path: Path, dtype: np.dtype | str, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of the memmap `path` of `dtype`, as a copy (never a view of the memmap)."""
    return np.array(_memmap(Path(path), np.dtype(dtype))[start:stop])
