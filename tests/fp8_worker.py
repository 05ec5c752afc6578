"""Spawned gloo ranks training torchao FP8 with and without `fp8.all_gather`, counting FSDP2's all-gather bytes."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from gloo_groups import run_each_on_its_group
from helpers import small_model
from torchao.float8 import fsdp_utils

from megaolmo.config import Fp8Config, ParallelConfig
from megaolmo.model.engine import ParallelOLMo
from megaolmo.model.fp8 import precompute_fp8_scales

STEPS, GLOBAL_BATCH, SEQ_LEN = 3, 8, 16
# Every block linear runs in FP8 under tp2 (local dims multiples of 16). OLMo-1's blocks have no norm weights:
# each FSDP2 unit gathers float8 weights alone; OLMo-2's gather them beside bf16 norm weights.
MODELS = {
    arch: small_model(
        arch=arch,
        ffn_hidden_size=128,
        max_sequence_length=SEQ_LEN,
        weight_tying=False,
        kernels="torch",
        linear="torchao",
    )
    for arch in ("olmo1", "olmo2")
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Run:
    name: str
    model: str
    all_gather: bool
    param_dtype: str = "bf16"
    parallel: dict = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        p = self.parallel
        return p.get("tp", 1) * p.get("pp", 1) * p.get("dp", 1)


class StepCounter:
    """What FSDP2's all-gathers do in a step: the bytes each sends from this rank over its DP group (and their
    dtype), and how many float8 casts of a weight compute their own scale instead of a precomputed one.

    FSDP2 calls `dist.all_gather_single` at each unshard (megaolmo's TP bound the function at import, and the
    group check keeps TP's out), and torchao's weight casts with `hp_tensor_to_float8_dynamic` when it has no
    precomputed scale.
    """

    def __init__(self, dp_group) -> None:
        self.dp_ranks, self.calls, self.dynamic_casts = dist.get_process_group_ranks(dp_group), [], 0
        self.all_gather, self.dynamic = dist.all_gather_single, fsdp_utils.hp_tensor_to_float8_dynamic

    def _all_gather(self, output, input, group=None, async_op=False):
        if dist.get_process_group_ranks(group) == self.dp_ranks:
            self.calls.append((input.numel() * input.element_size(), str(input.dtype)))
        return self.all_gather(output, input, group=group, async_op=async_op)

    def _dynamic(self, *args, **kwargs):
        self.dynamic_casts += 1
        return self.dynamic(*args, **kwargs)

    @contextlib.contextmanager
    def step(self):
        self.calls, self.dynamic_casts = [], 0
        dist.all_gather_single, fsdp_utils.hp_tensor_to_float8_dynamic = self._all_gather, self._dynamic
        try:
            yield
        finally:
            dist.all_gather_single, fsdp_utils.hp_tensor_to_float8_dynamic = self.all_gather, self.dynamic


def fp8_weights(model: ParallelOLMo) -> list[tuple[str, torch.Tensor]]:
    """(stage.name, local shard) of the weights FSDP2 all-gathers in float8 (the shard itself: it holds the scale)."""
    return [(f"{i}.{name}", param._local_tensor) for i, stage in enumerate(model.stages)
            for name, param in stage.named_parameters()
            if type(param._local_tensor).__name__ == "Float8AllGatherWeight"]  # fmt: skip


def precomputed_scales_match(model: ParallelOLMo) -> bool:
    """Each float8 weight's precomputed scale is float8's max over the amax of its whole (DP-gathered) weight."""
    for _, local in fp8_weights(model):
        amax = local._tensor.abs().max()
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=model.mesh.dp_group)
        expected = (torch.finfo(torch.float8_e4m3fn).max / amax.double()).float()
        if local._precomputed_scale is None or not torch.equal(local._precomputed_scale, expected):
            return False
    return True


def train(run: Run) -> tuple[dict, dict[str, torch.Tensor]]:
    """STEPS AdamW steps, the scales precomputed after each: (losses, gradient norms, what the all-gathers did,
    checks; the final weights, unsharded)."""
    fp8 = Fp8Config(all_gather=run.all_gather)
    model = ParallelOLMo(MODELS[run.model], ParallelConfig(device="cpu", **run.parallel), seed=5,
                         param_dtype=DTYPES[run.param_dtype], fp8=fp8)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-5, foreach=False)
    input_ids = torch.randint(0, 256, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(input_ids, -1, 1)
    share = GLOBAL_BATCH // model.mesh.dp
    rows = slice(model.mesh.dp_rank * share, (model.mesh.dp_rank + 1) * share)
    counter = StepCounter(model.mesh.dp_group)
    record: dict = {"ce": [], "grad_norm": [], "bytes": [], "dynamic_casts": [], "scales_match": []}
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        with counter.step():
            losses = model.forward_backward(input_ids[rows], labels[rows], micro_batch_size=1)
        record["bytes"].append(counter.calls)
        record["dynamic_casts"].append(counter.dynamic_casts)
        record["grad_norm"].append(model.clip_grad_norm_(1.0))
        optimizer.step()
        precompute_fp8_scales(model.stages, fp8)
        record["scales_match"].append(precomputed_scales_match(model))
        record["ce"].append(losses.ce)
    record["fp8_weights"] = [name for name, _ in fp8_weights(model)]
    full = model.full_tensors()
    record["finite"] = all(math.isfinite(t.float().sum().item()) for t in full.values())
    record["plain"] = all(type(t) is torch.Tensor for t in full.values())
    return record, {name: t.float() for name, t in full.items()}


def run_layouts(rank: int, nprocs: int, runs: list[dict], out_dir: str) -> None:
    del nprocs

    def work(run: Run, target: Path) -> None:
        record, weights = train(run)
        (target / f"rank{rank}.json").write_text(json.dumps(record))
        torch.save(weights, target / f"rank{rank}.pt")

    run_each_on_its_group(rank, [Run(**run) for run in runs], out_dir, work)
