"""Many layouts in one spawn of ranks: each on a fresh gloo group of the first ranks it needs."""

from __future__ import annotations

import datetime
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist


class Spec(Protocol):
    name: str

    @property
    def world_size(self) -> int: ...


def run_each_on_its_group(rank: int, specs: Sequence[Spec], out_dir: str, work: Callable[[Spec, Path], None]) -> None:
    """Run `work(spec, spec's directory)` on the ranks each spec needs. A failure is written to
    rank<N>.error in that directory for the test reading the spec to report, and the next spec still runs."""
    torch.set_num_threads(1)
    for spec in specs:
        if rank >= spec.world_size:
            continue
        target = Path(out_dir) / spec.name
        target.mkdir(parents=True, exist_ok=True)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{target / 'store'}",
            rank=rank,
            world_size=spec.world_size,
            timeout=datetime.timedelta(seconds=120),
        )
        try:
            work(spec, target)
        except Exception:  # noqa: BLE001 - reported by the test that reads this spec
            (target / f"rank{rank}.error").write_text(traceback.format_exc())
        finally:
            dist.destroy_process_group()
