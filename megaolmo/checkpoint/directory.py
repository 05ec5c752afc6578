"""A run's directory of checkpoints: their names, `latest`, retention, leftovers of interrupted saves, and
which one a run resumes from. Rank 0 keeps it; every checkpoint in it is complete (it has its manifest).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megaolmo.atomic import write_durably

MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"


def checkpoint_name(step: int) -> str:
    return f"step{step:06d}"


def update_latest(directory: Path, name: str) -> None:
    """Point `latest` at checkpoint `name`, atomically."""
    tmp = directory / f".{LATEST_FILE}.tmp"
    write_durably(tmp, (name + "\n").encode())
    os.replace(tmp, directory / LATEST_FILE)


def apply_retention(directory: Path, keep_last: int, keep_every: int | None) -> None:
    """Keep the newest `keep_last` checkpoints, and every `keep_every`-th step for good."""
    steps = sorted(int(p.name.removeprefix("step")) for p in directory.glob("step[0-9]*") if p.is_dir())
    keep = set(steps[-keep_last:]) if keep_last > 0 else set(steps[-1:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    for step in steps:
        if step not in keep:
            shutil.rmtree(directory / checkpoint_name(step), ignore_errors=True)


def remove_incomplete(directory: Path) -> None:
    """Delete what saves interrupted by a crash left behind (they never became checkpoints). Rank 0 only."""
    for leftover in [*directory.glob(".step*.tmp"), *directory.glob(f".{LATEST_FILE}.tmp")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def find_resume_point(directory: Path) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one; None when there is none."""
    latest = directory / LATEST_FILE
    if latest.is_file():
        candidate = directory / latest.read_text().strip()
        if (candidate / MANIFEST_FILE).is_file():
            return candidate
    complete = sorted(p for p in directory.glob("step[0-9]*") if (p / MANIFEST_FILE).is_file())
    return complete[-1] if complete else None
