"""Predicted step time and MFU from a stated roofline.

Each GEMM takes max(FLOPs / (peak x matmul_efficiency), bytes / HBM bandwidth);
backward runs two GEMMs (input and weight gradient) per forward GEMM.
Attention is flash attention: causal, so half the s^2 FLOPs, at the same
efficiency, and its backward costs 2.5 forwards (it recomputes the scores);
an OLMo-3 sliding block computes only its window's band (flash-attn), or
every pair under SDPA's mask. Element-wise work (norms, QK-norm, RoPE, SwiGLU,
residual adds, the layout copies around SDPA, the loss) moves its bytes at HBM
bandwidth; its backward moves twice the forward's bytes. Recompute repeats
forward work in backward.
TP collectives and pipeline sends are exposed (nothing overlaps them), except
under parallel.async_tp, whose overlap hides ASYNC_TP_HIDDEN of TP's time.
FSDP's all-gathers overlap compute (prefetch) except the first block's of each
pass, or whatever does not fit under the step's compute; reduce-scatters
overlap the last micro-batch's backward except one unit's, but with pp > 1
torch pipelining reduces after the last backward, so they are all exposed.
A step is m t_mb + (pp - 1) t_mb / vp (the bubble) + exposed communication +
the optimizer (AdamW and clipping, HBM-bound).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megaolmo.model.flops import attention_fraction
from megaolmo.plan.comm import (
    Traffic,
    dp_gathers_per_step,
    pp_bytes_per_microbatch,
    ring,
    tp_bytes_per_microbatch,
    traffic,
)
from megaolmo.plan.hardware import Hardware
from megaolmo.plan.layout import PipelineRank, Placement
from megaolmo.plan.memory import FP32, dtype_bytes

ATTENTION_BACKWARD = 2.5  # flash attention's backward, in forwards
ADAMW_BYTES = 28  # per parameter: read weight, grad, two moments (16), write weight and moments (12)
CLIP_BYTES = 12  # per parameter: read the gradient for the norm, read and write it to scale
# Async TP (inductor's micro-pipelined all-gather + GEMM and GEMM + reduce-scatter) hides this fraction of TP's
# collective time. An assumption, not measured on megaolmo: torchtitan reports 1.09-1.16x end-to-end at Llama-3
# 70B and 405B (tp8, H100), which needs about half of an exposed TP share of 20-30% of the step hidden.
ASYNC_TP_HIDDEN = 0.5


@dataclass
class MicrobatchTime:
    """Seconds one micro-batch spends on one pipeline rank, by what it waits for."""

    gemm: float
    attention: float
    elementwise: float
    recompute: float
    tp: float
    pp: float

    @property
    def compute(self) -> float:
        return self.gemm + self.attention + self.elementwise + self.recompute

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.pp


@dataclass
class StepTime:
    """The predicted step of the slowest pipeline rank."""

    rank: PipelineRank
    microbatch: MicrobatchTime
    n_microbatches: int
    bubble: float
    exposed: dict[str, float] = field(default_factory=dict)
    optimizer: float = 0.0
    traffic: list[Traffic] = field(default_factory=list)
    model_flops: float = 0.0
    world_size: int = 1
    peak_flops: float = 1.0

    @property
    def seconds(self) -> float:
        return self.n_microbatches * self.microbatch.total + self.bubble + sum(self.exposed.values()) + self.optimizer

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.seconds * self.world_size * self.peak_flops)


def _gemm(m: int, k: int, n: int, element: int, hw: Hardware) -> float:
    """Forward + backward time of an [m, k] x [k, n] GEMM: three GEMMs of equal FLOPs and bytes."""
    flops = 2 * m * k * n
    moved = (m * k + k * n + m * n) * element
    return 3 * max(flops / (hw.peak_flops * hw.matmul_efficiency), moved / hw.hbm_bytes_per_s)


def attention_forward(placement: Placement, hw: Hardware, window: int | None = None) -> float:
    """Forward seconds of one block's attention core with this window (None: full causal).

    Flash attention (SDPA's is_causal kernel, flash-attn with or without a window) skips the tiles no query
    sees: the causal half of s^2, or the band of a window (megaolmo.model.flops.attention_fraction). SDPA
    given a sliding window's boolean mask runs the memory-efficient kernel over every (query, key) pair
    and reads the mask as an [s, s] bias.
    """
    work, layout, model = placement.work, placement.layout, placement.model
    compute, _ = dtype_bytes(placement)
    b, s, tp = layout.micro_batch_size, work.seq_len, layout.tp
    q, kv = model.n_heads * model.head_dim // tp, model.kv_heads * model.head_dim // tp
    causal_flops = 2 * b * s * s * q  # QK^T and PV, 2 s^2 hd FLOPs each per head, causal half
    attention_bytes = s * b * (2 * q + 2 * kv) * compute
    if window is None or window >= s:
        flops = causal_flops
    elif model.attention == "flash":
        flops = causal_flops * attention_fraction(s, window)
    else:
        flops, attention_bytes = 2 * causal_flops, attention_bytes + s * s * compute
    return max(flops / (hw.peak_flops * hw.matmul_efficiency), attention_bytes / hw.hbm_bytes_per_s)


def _layer_forward(placement: Placement, hw: Hardware) -> tuple[float, float]:
    """(GEMM forward + backward, element-wise forward) seconds of one block (attention: `attention_forward`)."""
    work, layout, model = placement.work, placement.layout, placement.model
    compute, residual = dtype_bytes(placement)
    tp, b, s, h = layout.tp, layout.micro_batch_size, work.seq_len, model.d_model
    tokens = s * b
    rows = tokens // tp if layout.sequence_parallel else tokens
    q, kv = model.n_heads * model.head_dim // tp, model.kv_heads * model.head_dim // tp
    ffn = model.ffn_hidden_size // tp
    gemm = (
        _gemm(tokens, h, q + 2 * kv, compute, hw)
        + _gemm(tokens, q, h, compute, hw)
        + _gemm(tokens, h, 2 * ffn, compute, hw)
        + _gemm(tokens, ffn, h, compute, hw)
    )
    # OLMo-1's LayerNorms read the residual and write the normalized input; OLMo-2/3's RMSNorms read a
    # sublayer's output and write its normalized copy for the residual add: the same bytes.
    norm_input = compute if model.norm_after else residual
    elementwise_bytes = (
        2 * rows * h * (norm_input + compute)  # two norms: read, write
        + 2 * 3 * rows * h * residual  # two residual adds
        + 2 * tokens * (q + kv) * compute  # RoPE reads and writes q and k
        + 2 * tokens * (2 * q + 2 * kv) * compute  # q, k, v to [b, heads, s, hd] and the output back
        + 3 * tokens * ffn * compute  # SwiGLU reads [up | gate], writes the product
    )
    if model.qk_norm:
        elementwise_bytes += tokens * (q + kv) * _qk_norm_bytes_per_element(placement)
    return gemm, elementwise_bytes / hw.hbm_bytes_per_s


def _qk_norm_bytes_per_element(placement: Placement) -> int:
    """HBM bytes QK-norm moves per element of q and k in forward. The kernel (one rank) reads and writes
    once; under TP the norm is torch ops around an all-reduce: upcast (read, write fp32), square (read,
    write), sum (read), scale (read, write), downcast (read fp32, write) and the weight (read, write)."""
    compute, _ = dtype_bytes(placement)
    if placement.layout.tp == 1 and placement.work.kernels == "triton":
        return 2 * compute
    upcast = compute + FP32 if compute != FP32 else 0
    downcast = FP32 + compute if compute != FP32 else 0
    return upcast + 2 * FP32 + FP32 + 2 * FP32 + downcast + 2 * compute


def microbatch_time(placement: Placement, rank: PipelineRank, hw: Hardware) -> MicrobatchTime:
    """Forward and backward of one micro-batch through every stage module of this rank."""
    layout, work = placement.layout, placement.work
    compute, _ = dtype_bytes(placement)
    gemm, elementwise = _layer_forward(placement, hw)
    layers = rank.layers
    # Attention per block: OLMo-3's sliding blocks cost less than its full ones (or more, under SDPA's mask).
    windows = [placement.model.attention_window(i) for i in placement.block_indices(rank)]
    attention = sum(attention_forward(placement, hw, window) for window in windows)
    per_layer = {"none": 0.0, "selective": 0.0, "full": gemm / 3 + elementwise}
    tp_exposed = 1 - ASYNC_TP_HIDDEN if layout.async_tp else 1.0
    recompute = layers * per_layer[layout.activation_checkpointing]
    if layout.activation_checkpointing != "none":
        recompute += attention
    total_gemm = layers * gemm
    total_elementwise = layers * 3 * elementwise  # forward, and a backward moving twice the bytes
    if rank.last:
        tokens = work.seq_len * layout.micro_batch_size
        vocab = placement.embedding_shape[0]
        total_gemm += _gemm(tokens, placement.model.d_model, vocab, compute, hw)
        loss_bytes = tokens * vocab * (compute + 3 * FP32)  # upcast, softmax; backward below
        total_elementwise += 3 * loss_bytes / hw.hbm_bytes_per_s
    return MicrobatchTime(
        gemm=total_gemm,
        attention=(1 + ATTENTION_BACKWARD) * attention,
        elementwise=total_elementwise,
        recompute=recompute,
        tp=tp_bytes_per_microbatch(placement, rank) / hw.link_bytes_per_s(layout.tp) * tp_exposed,
        pp=pp_bytes_per_microbatch(placement) / hw.link_bytes_per_s(layout.tp * layout.dp * layout.pp),
    )


def _exposed(placement: Placement, rank: PipelineRank, hw: Hardware, flows: list[Traffic], busy: float):
    """Communication the step waits for, beyond what runs under compute (see the module docstring)."""
    layout = placement.layout
    compute, _ = dtype_bytes(placement)
    exposed = {}
    flow = {f.kind: f for f in flows}
    if "dp_gather" in flow:
        passes, _ = dp_gathers_per_step(placement)
        block = compute * placement.block_params * ring(layout.dp) / flow["dp_gather"].bytes_per_second
        exposed["DP all-gather"] = max(passes * block, flow["dp_gather"].seconds - busy)
    if "dp_scatter" in flow:
        scatter = flow["dp_scatter"]
        unit = FP32 * max(placement.block_params, placement.root_params(rank)) * ring(layout.dp)
        exposed["DP reduce-scatter"] = scatter.seconds if layout.pp > 1 else unit / scatter.bytes_per_second
    if "tied" in flow:
        exposed["tied embedding all-reduce"] = flow["tied"].seconds
    return exposed


def step_time(placement: Placement, hw: Hardware) -> StepTime:
    """The step time of the slowest pipeline rank (they wait for each other at every boundary)."""
    layout = placement.layout
    candidates = []
    for rank in placement.ranks():
        micro = microbatch_time(placement, rank, hw)
        flows = traffic(placement, rank, hw)
        m = placement.n_microbatches
        optimizer = (ADAMW_BYTES + CLIP_BYTES) * placement.sharded_params(rank)
        candidates.append(
            StepTime(
                rank=rank,
                microbatch=micro,
                n_microbatches=m,
                bubble=(layout.pp - 1) * micro.total / layout.vp,
                exposed=_exposed(placement, rank, hw, flows, m * micro.compute),
                optimizer=optimizer / hw.hbm_bytes_per_s,
                traffic=flows,
                model_flops=placement.work.model_flops_per_step,
                world_size=layout.world_size,
                peak_flops=hw.peak_flops,
            )
        )
    return max(candidates, key=lambda step: step.seconds)
