"""Spawned gloo ranks training the same model in bf16 on several layouts, for the bf16 parity test."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from gloo_groups import run_each_on_its_group
from parallel_worker import GLOBAL_BATCH, MODELS, global_batch

from megaolmo.config import ParallelConfig
from megaolmo.model.engine import ParallelOLMo

STEPS = 4
# The embedding padded as TP2 pads it (to a multiple of 128 x tp), for one process too: the same model.
MODEL = dataclasses.replace(MODELS["tied"], embedding_size=1280)


@dataclass
class Run:
    name: str
    parallel: dict = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        p = self.parallel
        return p.get("tp", 1) * p.get("cp", 1) * p.get("pp", 1) * p.get("dp", 1)


def bf16_losses(parallel: dict) -> list[float]:
    """Losses of STEPS AdamW steps of the tied model in bf16 (fp32 master weights) on this layout."""
    model = ParallelOLMo(MODEL, ParallelConfig(device="cpu", **parallel), seed=0,
                         param_dtype=torch.bfloat16)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=False)
    input_ids, labels = global_batch()
    share = GLOBAL_BATCH // model.mesh.dp
    rows = slice(model.mesh.dp_rank * share, (model.mesh.dp_rank + 1) * share)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        losses.append(model.forward_backward(input_ids[rows], labels[rows], micro_batch_size=1).ce)
        model.clip_grad_norm_(1.0)
        optimizer.step()
    return losses


def run_layouts(rank: int, nprocs: int, runs: list[dict], out_dir: str) -> None:
    del nprocs

    def work(run: Run, target: Path) -> None:
        losses = bf16_losses(run.parallel)
        if dist.get_rank() == 0:
            (target / "losses.json").write_text(json.dumps(losses))

    run_each_on_its_group(rank, [Run(**run) for run in runs], out_dir, work)
