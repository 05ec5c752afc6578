"""Training with compiled blocks against the same training eager: on one process, or on spawned gloo ranks.

Each layout trains twice on the same ranks, eager and then with every block compiled, and records the
losses, the first step's gradients and how many graphs the compiler had made after each step (counted from
the run's start). Dynamo's caches are reset between runs, so no run reuses another's graphs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._dynamo
from gloo_groups import run_each_on_its_group
from parallel_worker import GLOBAL_BATCH, MODELS, global_batch
from torch._dynamo.utils import counters

from megaolmo.config import ModelConfig, ParallelConfig
from megaolmo.model.engine import ParallelOLMo
from megaolmo.model.parallelize import apply_compile

STEPS = 3


@dataclass
class Layout:
    name: str
    model: str
    parallel: dict = field(default_factory=dict)
    document_masking: bool = False
    micro_batch_size: int = 1
    async_tp_patterns: bool = False  # instead of training: what inductor's async-TP pass would find (see below)

    @property
    def world_size(self) -> int:
        p = self.parallel
        return p.get("tp", 1) * p.get("pp", 1) * p.get("dp", 1)


def unique_graphs() -> int:
    """Graphs dynamo has captured in this process (each one a compilation; `torch._dynamo.reset` keeps the count)."""
    return counters["stats"]["unique_graphs"]


def train(model: ParallelOLMo, layout: Layout) -> dict:
    """STEPS AdamW steps on this rank's rows of the global batch; losses, first-step gradients, graph counts,
    and an evaluation of half the rows afterwards (forward only, another batch shape)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    input_ids, labels = global_batch(layout.document_masking)
    share = GLOBAL_BATCH // model.mesh.dp
    rows = slice(model.mesh.dp_rank * share, (model.mesh.dp_rank + 1) * share)
    record: dict = {"ce": [], "graphs": []}
    before = unique_graphs()
    for step in range(STEPS):
        optimizer.zero_grad()
        record["ce"].append(model.forward_backward(input_ids[rows], labels[rows], layout.micro_batch_size).ce)
        if step == 0:
            record["grads"] = model.full_tensors(grads=True)
        model.clip_grad_norm_(1.0)
        optimizer.step()
        record["graphs"].append(unique_graphs() - before)
    half = slice(rows.start, rows.start + share // 2)
    record["eval_nll"] = model.evaluate(input_ids[half], labels[half], layout.micro_batch_size)[0]
    record["graphs"].append(unique_graphs() - before)
    return record


def eager_and_compiled(layout: Layout, *, backend: str, config: ModelConfig | None = None) -> dict:
    """{"eager": record, "compiled": record} of the same training on this layout.

    The compiled run builds the eager model and compiles its blocks afterwards, with `backend`: the
    forwards that `model.compile=true` replaces are the same whether FSDP wrapped the blocks before or after.
    """
    config = config or MODELS[layout.model]
    parallel = ParallelConfig(device="cpu", **layout.parallel)
    records = {}
    for name in ("eager", "compiled"):
        torch._dynamo.reset()
        model = ParallelOLMo(config, parallel, seed=7, z_loss_multiplier=1e-3, document_masking=layout.document_masking)
        if name == "compiled":
            for stage in model.stages:
                apply_compile(stage, fullgraph=True, backend=backend)
        records[name] = train(model, layout)
    torch._dynamo.reset()
    return records


def one_process(layout: Layout) -> dict:
    """Eager and `model.compile=true` (inductor) on this process."""
    torch._dynamo.reset()
    records = {}
    for compiled in (False, True):
        model = ParallelOLMo(
            dataclasses.replace(MODELS[layout.model], compile=compiled),
            ParallelConfig(device="cpu", **layout.parallel),
            seed=7,
            z_loss_multiplier=1e-3,
            document_masking=layout.document_masking,
        )
        records["compiled" if compiled else "eager"] = train(model, layout)
    torch._dynamo.reset()
    return records


class _StopAfterPostGrad(Exception):
    """Raised by the pattern probe once it has seen a graph: inductor need not generate its code."""


def async_tp_patterns(layout: Layout) -> dict:
    """What inductor's micro-pipeline TP pass (parallel.async_tp) would fuse in the first block's forward graph.

    The pass itself runs only with NCCL; its matchers are plain graph code, run here on the graph inductor has
    after its post-grad passes (the graph the pass sees), before any code is generated: each all-gather's
    consuming matmuls and whether a matmul produces each reduce-scatter's input.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass
    from torch._inductor.fx_passes import micro_pipeline_tp as tp_pass

    found: dict = {}

    class Probe(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            gathers, scatters = tp_pass.find_all_gather_patterns(graph), tp_pass.find_reduce_scatter_patterns(graph)
            found["gather_matmuls"] = [len(tp_pass._find_consumer_matmuls(g.res_node)) for g in gathers]
            found["scatter_from_matmul"] = [tp_pass._find_producer_matmul(s.input_node) is not None for s in scatters]
            raise _StopAfterPostGrad

        def uuid(self) -> None:
            return None

    torch._dynamo.reset()
    model = ParallelOLMo(MODELS[layout.model], ParallelConfig(device="cpu", **layout.parallel), seed=7)
    apply_compile(model.stages[0], fullgraph=True)
    input_ids, labels = global_batch()
    with inductor_config.patch(post_grad_custom_post_pass=Probe(), fx_graph_cache=False):
        try:
            model.forward_backward(input_ids[:2], labels[:2], 2)
        except Exception:  # dynamo wraps the probe's stop in an error of its own
            if not found:
                raise
    torch._dynamo.reset()
    return found


def run_layouts(rank: int, n_procs: int, layouts: list[dict], out_dir: str) -> None:
    """Entry point of each spawned rank: every layout eager and compiled with aot_eager (or probed)."""
    del n_procs

    def save(layout: Layout, target: Path) -> None:
        if layout.async_tp_patterns:
            torch.save(async_tp_patterns(layout), target / f"rank{rank}.pt")
        else:
            torch.save(eager_and_compiled(layout, backend="aot_eager"), target / f"rank{rank}.pt")

    run_each_on_its_group(rank, [Layout(**spec) for spec in layouts], out_dir, save)
