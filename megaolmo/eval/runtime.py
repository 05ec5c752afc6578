"""Where evaluation runs: the device, the dtype, the model, and (under torchrun) this rank's share.

Without --tp/--pp evaluation is data parallel: every rank holds the whole model (read from a consolidated
or a sharded checkpoint of any training layout), scores every `world`-th document or example, and the
per-item results are gathered so every rank ends with the same totals. One process needs no process
group at all. (A model sharded over TP x PP is megaolmo.eval.sharded's.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from megaolmo.checkpoint import load
from megaolmo.errors import EvalError
from megaolmo.model import OLMo
from megaolmo.parallel.launch import init_distributed

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_device(name: str | None) -> torch.device:
    """`name` as given, else this rank's GPU when CUDA is available, else the CPU."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise EvalError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EvalError(f"--device {name} asked for CUDA, which is not available here; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU (what OLMo evaluates in) and fp32 on CPU (where bf16 is slow and imprecise)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def start(device: torch.device) -> None:
    """Join the torchrun job when there is one (NCCL on GPUs, gloo on CPU); a no-op for one process."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device.type)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks: (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(items: list[tuple[int, Any]]) -> list[Any]:
    """All ranks' (index, item) pairs, merged and sorted by index, on every rank.

    Evaluation output is small (a few numbers per document or example), so pickled objects over the
    default group are simple and cheap; it works alike on gloo and NCCL.
    """
    world = rank_and_world()[1]
    if world == 1:
        return [item for _, item in sorted(items, key=lambda pair: pair[0])]
    parts: list[list[tuple[int, Any]] | None] = [None] * world
    dist.all_gather_object(parts, items)
    merged = [pair for part in parts for pair in part or []]
    return [item for _, item in sorted(merged, key=lambda pair: pair[0])]


def my_share(items: Sequence[T]) -> list[tuple[int, T]]:
    """(index, item) for this rank's items: every `world`-th one, starting at `rank`."""
    rank, world = rank_and_world()
    return [(i, items[i]) for i in range(rank, len(items), world)]


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> OLMo:
    """The checkpoint's model in eval mode on `device`; a missing file is one EvalError line (a bad
    checkpoint raises CheckpointError, which the entry point reports the same way)."""
    try:
        return load(path, device=device, dtype=dtype)
    except FileNotFoundError as err:
        raise EvalError(str(err)) from None
