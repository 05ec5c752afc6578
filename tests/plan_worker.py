"""Measured peak memory of tiny training runs, for checking the planner: in this process or in spawned gloo ranks.

The peak is read from torch.profiler's "[memory]" events (profile_memory=True)
around model construction and two training steps. The profiler records only
what happens on profiled threads, and gloo lets go of a collective's tensors
(its own temporaries, and inputs the caller dropped first) on its worker
thread: those frees go unrecorded and the naive running sum drifts upwards by
a different amount each run. So blocks are paired with their frees by address
(from the Chrome trace: Kineto's events do not carry it): a block that is never
freed is taken as freed when its collective ended, if it was allocated inside
one (a gloo temporary), or when its address is next reused, or the first
collective after its allocation ended, whichever is earlier (an input gloo
held last).
"""

from __future__ import annotations

import bisect
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from gloo_groups import run_each_on_its_group
from torch.profiler import ProfilerActivity, profile

from megaolmo.config import ModelConfig, OptimConfig, ParallelConfig
from megaolmo.model.engine import ParallelOLMo
from megaolmo.train.optim import build_optimizer

# Activations are about half of the fp32 peak (as at d_model 256, micro-batch 4), at an eighth of the FLOPs:
# on a CPU without bf16 matmuls (AVX2 only) bf16 runs 10-35x slower than fp32.
SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH, VOCAB = 128, 8, 2, 512
MODEL = ModelConfig(
    d_model=128, n_layers=4, n_heads=4, ffn_hidden_size=352, vocab_size=VOCAB, max_sequence_length=SEQ_LEN,
    kernels="torch",
)  # fmt: skip


@dataclass
class Run:
    """A layout trained for two steps: its name, parallel degrees and precision."""

    name: str
    parallel: dict = field(default_factory=dict)
    bf16: bool = False
    loss_chunk_tokens: int | None = None
    document_masking: bool = False  # attention within the documents the random ids' EOS (0) ends

    @property
    def world_size(self) -> int:
        p = self.parallel
        return p.get("tp", 1) * p.get("cp", 1) * p.get("pp", 1) * p.get("dp", 1)


def peak_live_bytes(prof: profile) -> int:
    """The most bytes alive at once during the profile (see the module docstring)."""
    with tempfile.TemporaryDirectory() as directory:
        trace = Path(directory) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    collectives = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e["name"].startswith("c10d::")
    )
    starts = [start for start, _ in collectives]
    blocks, live = [], {}  # [allocated at, freed at, bytes, address reused at]
    for event in memory:
        address, nbytes, ts = event["args"]["Addr"], event["args"]["Bytes"], event["ts"]
        if nbytes > 0:
            if address in live:
                live.pop(address)[3] = ts
            live[address] = block = [ts, None, nbytes, None]
            blocks.append(block)
        elif address in live:
            live.pop(address)[1] = ts
    changes = []
    for allocated, freed, nbytes, reused in blocks:
        if freed is None:
            k = bisect.bisect_right(starts, allocated) - 1
            if k >= 0 and collectives[k][1] >= allocated:
                freed = collectives[k][1]
            elif reused is not None:
                after = collectives[k + 1][1] if k + 1 < len(collectives) else reused
                freed = min(after, reused)
        changes.append((allocated, nbytes))
        if freed is not None:
            changes.append((freed, -nbytes))
    total = peak = 0
    for _, nbytes in sorted(changes):
        total += nbytes
        peak = max(peak, total)
    return peak


def train_two_steps(run: Run, device: str = "cpu") -> ParallelOLMo:
    """Build the model and optimizer and take two steps as megaolmo.train does (its optimizer, clipping)."""
    dtype = torch.bfloat16 if run.bf16 else torch.float32
    model = ParallelOLMo(MODEL, ParallelConfig(device=device, **run.parallel), seed=0, param_dtype=dtype,
                         loss_chunk_tokens=run.loss_chunk_tokens, document_masking=run.document_masking)  # fmt: skip
    optimizer = build_optimizer(model.named_parameters(), OptimConfig(), model.mesh.device)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    share = GLOBAL_BATCH // model.mesh.dp  # every CP rank of a DP rank gets its rows (and takes its tokens)
    rows = slice(model.mesh.dp_rank * share, (model.mesh.dp_rank + 1) * share)
    for _ in range(2):
        model.forward_backward(ids[rows], labels[rows], MICRO_BATCH)
        model.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def profiled_peak(run: Run) -> tuple[int, int]:
    """(pipeline rank, peak live bytes) of this process for `run` on CPU."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = train_two_steps(run)
    return model.mesh.pp_rank, peak_live_bytes(prof)


def measure_runs(rank: int, runs: list[dict], out_dir: str) -> None:
    """Entry point of each spawned rank: every run in turn on a fresh gloo group of its first ranks."""

    def measure(run: Run, target: Path) -> None:
        pp_rank, peak = profiled_peak(run)
        (target / f"rank{rank}.json").write_text(json.dumps({"pp_rank": pp_rank, "peak": peak}))

    run_each_on_its_group(rank, [Run(**spec) for spec in runs], out_dir, measure)
