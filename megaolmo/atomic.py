"""Directories that appear whole or not at all: written under a temporary name, renamed when complete;
and the fsyncs that make such a rename durable.

A crash, a Ctrl-C or a bad input halfway through must leave nothing that looks
finished: prepared data is cached and reused without being checked again, and a
checkpoint or converted model is loaded as it is.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def refuse_existing(path: Path, error: type[Exception]) -> None:
    """Never write over anything: `path` must not exist or be an empty directory."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise error(f"output {path} already exists and is not empty; choose a new directory or remove it")


@contextmanager
def atomic_directory(path: Path, error: type[Exception], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; it becomes `path` when the block succeeds.

    Without `overwrite` an existing non-empty `path` is refused (with `error`) before anything is
    written. With it, the old directory is replaced only once the new one is complete.
    """
    path = Path(path)
    if not overwrite:
        refuse_existing(path, error)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for entry in tmp.rglob("*"):  # every file, and the entries of every subdirectory
            if entry.is_dir():
                fsync_dir(entry)
                continue
            with open(entry, "rb") as handle:
                os.fsync(handle.fileno())
        if not overwrite:
            refuse_existing(path, error)  # someone may have written there meanwhile
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it: on disk before anything that depends on it is renamed."""
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (a rename into it, say) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
