"""Many layouts in one spawn of ranks: each on a fresh gloo group of the first ranks it needs.

The ranks are forked from a server process that imported torch and megaolmo once: a fresh
interpreter per rank spends ~6 CPU seconds importing them, most of a minute for 8 ranks on
2 cores. The server is started once per test session (by the first spawn) and forks cleanly
(one thread, no process group, no CUDA).
"""

from __future__ import annotations

import datetime
import multiprocessing
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# What every worker imports; the server cannot import the tests' own modules (in Python 3.11 it does
# not get the tests' sys.path), which are light once these are loaded. torchao: the FP8 layouts.
PRELOAD = ["megaolmo.model.engine", "megaolmo.train.optim", "torch.profiler", "torchao.float8"]


def spawn(entry: Callable, args: tuple, nprocs: int) -> None:
    """`torch.multiprocessing.spawn(entry, args, nprocs)`, the ranks forked from the preloaded server."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)  # used when the server starts
    mp.start_processes(entry, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def spawned_results(out_dir: Path, specs: Sequence, group: Callable, run: Callable[[list, Path], None]):
    """The results directory of a spec, its group of specs run (`run(group's specs, out_dir)`) in one
    spawn when a test first asks for one of them: each group's time counts against its first test."""
    failed: dict = {}  # group -> the exception its spawn raised, raised again for each of its specs

    def results(spec) -> Path:
        key = group(spec)
        if key not in failed:
            failed[key] = None
            try:
                run([s for s in specs if group(s) == key], out_dir)
            except Exception as error:  # noqa: BLE001 - raised again for each spec of the group
                failed[key] = error
        if failed[key] is not None:
            raise failed[key]
        return out_dir / spec.name

    return results


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
