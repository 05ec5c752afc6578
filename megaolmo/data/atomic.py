"""Write an output directory all at once: build it under a temporary name, rename it at the end.

A crash, a Ctrl-C or a bad input halfway through must leave nothing that looks like finished data,
because finished data is cached and reused without being checked again.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megaolmo.data.errors import DataError


def check_new_output_dir(out_dir: Path) -> None:
    """Refuse an output directory that already holds something (never overwrite prepared data)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"output {out_dir} already exists and is not empty; choose a new directory or remove it")


@contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to write into; rename it to `out_dir` when the block succeeds."""
    out_dir = Path(out_dir)
    check_new_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_new_output_dir(out_dir)  # someone may have written there meanwhile
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
