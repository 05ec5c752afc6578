"""An epoch's data order on disk: built once, memory-mapped read-only by every rank.

`global_order(n, seed, epoch)` materializes the whole int64 permutation, 12 GB at Dolma's 1.5 B
instances, on every rank and for every epoch. Here one process writes it once into
`order-n{n}-seed{seed}-epoch{epoch}.u32` (uint64 only from n > 2**32: half the bytes), and a
batch's slice of the memmap touches only its own pages. The values are those of
`PCG64(seed + epoch).permutation(n)`: that is `arange(n)` shuffled in place, and the Fisher-Yates
draws depend only on n, not on the dtype of the array shuffled. The files are derived data: delete
them any time and they are built again.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from megaolmo.atomic import fsync_dir
from megaolmo.errors import DataError

CHUNK = 1 << 22  # elements of arange written at a time while building (16 MB of uint32)


def order_dtype(n_instances: int) -> np.dtype:
    """The smallest unsigned dtype that holds every index below `n_instances`."""
    return np.dtype(np.uint32 if n_instances <= 2**32 else np.uint64)


def _dtype(n_instances: int, dtype: np.dtype | str | None) -> np.dtype:
    """The caller's dtype (tests force uint64 on a small n), else the smallest that fits."""
    if dtype is None:
        return order_dtype(n_instances)
    dtype = np.dtype(dtype)
    if dtype not in (np.uint32, np.uint64) or n_instances - 1 > np.iinfo(dtype).max:
        raise DataError(f"dtype {dtype.name} cannot index {n_instances} instances; use uint32 or uint64, or drop dtype")
    return dtype


def order_path(
    order_dir: Path, n_instances: int, seed: int, epoch: int, *, dtype: np.dtype | str | None = None
) -> Path:
    """Where epoch `epoch`'s order lives; the name holds n, seed and epoch so another dataset's file is never read."""
    dtype = _dtype(n_instances, dtype)
    return Path(order_dir) / f"order-n{n_instances}-seed{seed}-epoch{epoch}.u{8 * dtype.itemsize}"


def build_order(
    order_dir: Path, n_instances: int, seed: int, epoch: int, *, dtype: np.dtype | str | None = None
) -> Path:
    """Write epoch `epoch`'s order to its file (replacing any) and return the path.

    The order is built in a temporary file and renamed into place once it is on disk, so a killed
    build leaves at most a `*.tmp` file, never a half-written order; builders racing each other write the
    same bytes, and the last rename wins.
    """
    if n_instances < 1:
        raise DataError(f"n_instances={n_instances} must be >= 1 to build a data order")
    dtype = _dtype(n_instances, dtype)
    path = order_path(order_dir, n_instances, seed, epoch, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # readable like the run's other files (mkstemp makes it private)
        os.posix_fallocate(fd, 0, n_instances * dtype.itemsize)  # a full disk fails here, not as SIGBUS mid-write
        order = np.memmap(tmp, dtype=dtype, mode="r+", shape=(n_instances,))
        for start in range(0, n_instances, CHUNK):
            stop = min(start + CHUNK, n_instances)
            order[start:stop] = np.arange(start, stop, dtype=dtype)
        # a plain ndarray view: Generator.shuffle's fast typed path runs only when type(x) is np.ndarray
        np.random.Generator(np.random.PCG64(seed + epoch)).shuffle(order.view(np.ndarray))
        order.flush()
        del order
        os.fsync(fd)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)  # the rename itself survives a crash
    return path


def open_order(
    order_dir: Path, n_instances: int, seed: int, epoch: int, *, dtype: np.dtype | str | None = None
) -> np.memmap:
    """Epoch `epoch`'s order as a read-only memmap; a missing file or one of the wrong size is refused."""
    dtype = _dtype(n_instances, dtype)
    path = order_path(order_dir, n_instances, seed, epoch, dtype=dtype)
    if not path.is_file():
        raise DataError(f"data order {path} does not exist; build it first (GlobalBatches.prepare_order)")
    size, expected = path.stat().st_size, n_instances * dtype.itemsize
    if size != expected:
        raise DataError(
            f"data order {path} has {size} bytes, not the {expected} of {n_instances} {dtype.name} indices; "
            "it is damaged: delete it and it is built again"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_instances,))
