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
Context parallelism (parallel.cp) runs every GEMM and element-wise op on s / cp
tokens and 1 / cp of the attention (zig-zag chunks balance the causal work);
the ring attention splits each block's attention into cp steps, each one's
transfer of k and v (and in backward of the fp32 dk, dv accumulator) overlapped
with that step's pairs of chunks: what a transfer takes beyond its step's
compute is exposed (`cp_ring_seconds`), and the accumulator's last hop home
has nothing to hide under. The ring skips the pairs causality or a window masks
whole, and runs every pair of those a mask (documents, a window) cuts.
A step is m t_mb + (pp - 1) t_mb / vp (the bubble) + exposed communication +
the optimizer (AdamW and clipping, HBM-bound).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from megaolmo.model.flops import attention_fraction
from megaolmo.parallel.context import ring_pairs
from megaolmo.plan.comm import (
    Traffic,
    cp_bytes_per_layer,
    dp_gathers_per_step,
    pp_bytes_per_microbatch,
    ring,
    ring_forward_repeats,
    tp_bytes_per_microbatch,
    traffic,
)
from megaolmo.plan.hardware import Hardware
from megaolmo.plan.layout import PipelineRank, Placement
from megaolmo.plan.memory import FP32, dtype_bytes, kv_buffer_elements

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
    cp: float = 0.0  # CP ring time the micro-batch waits for (beyond the attention blocks it overlaps)
    cp_overlapped: float = 0.0  # CP ring time hidden under the attention blocks

    @property
    def compute(self) -> float:
        return self.gemm + self.attention + self.elementwise + self.recompute

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.pp + self.cp


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
    given a mask (a sliding window's, or data.document_masking's on every block) runs the memory-efficient
    kernel over every (query, key) pair and reads the mask as a bias. Under context parallelism, the sum of
    the ring's steps on the busiest CP rank (`ring_step_forwards`).
    """
    if placement.layout.cp > 1:
        return sum(ring_step_forwards(placement, hw, window))
    work, layout, model = placement.work, placement.layout, placement.model
    compute, _ = dtype_bytes(placement)
    b, s, tp = layout.micro_batch_size, work.seq_len, layout.tp
    q, kv = model.n_heads * model.head_dim // tp, model.kv_heads * model.head_dim // tp
    causal_flops = 2 * b * s * s * q  # QK^T and PV, 2 s^2 hd FLOPs each per head, causal half
    attention_bytes = s * b * (2 * q + 2 * kv) * compute
    sliding = window is not None and window < s
    documents = work.document_masking and model.attention == "sdpa"
    if model.attention == "flash":
        flops = causal_flops * (attention_fraction(s, window) if sliding else 1.0)
    elif documents or sliding:  # the [b, 1, s, s] document mask or the [s, s] window bias
        flops, attention_bytes = 2 * causal_flops, attention_bytes + (b if documents else 1) * s * s * compute
    else:
        flops = causal_flops
    return max(flops / (hw.peak_flops * hw.matmul_efficiency), attention_bytes / hw.hbm_bytes_per_s)


@lru_cache(maxsize=4096)
def _pairs(
    cp: int, seq_len: int, rank: int, source: int, window: int | None, documents: bool
) -> tuple[tuple[bool, bool], ...]:
    """(diagonal, masked) of each pair CP rank `rank` computes with CP rank `source`'s keys, as the ring picks
    them (megaolmo.parallel.context.ring_pairs): skipped where causality or the window masks it whole."""
    if window is not None and window >= seq_len:
        window = None  # the band covers every causal key (megaolmo.model.olmo.causal_attention)
    pairs = ring_pairs(cp, rank, source, seq_len // (2 * cp), window, documents)
    return tuple((pair.diagonal, pair.masked) for pair in pairs)


def ring_step_forwards(placement: Placement, hw: Hardware, window: int | None = None) -> list[float]:
    """Forward seconds of each of the cp ring steps of one block on the busiest CP rank: its pairs, each a
    fused SDPA call of c = s / (2 cp) queries and keys (the causal half on an unmasked diagonal, every pair
    otherwise), reading its [b or 1, 1, c, c] bias where masked (built, then read)."""
    work, layout, model = placement.work, placement.layout, placement.model
    compute, _ = dtype_bytes(placement)
    q, kv = model.n_heads * model.head_dim // layout.tp, model.kv_heads * model.head_dim // layout.tp
    shape = (layout.cp, work.seq_len, window, work.document_masking, layout.micro_batch_size, q, kv, compute)
    return list(_ring_steps(*shape, hw.peak_flops * hw.matmul_efficiency, hw.hbm_bytes_per_s))


@lru_cache(maxsize=4096)
def _ring_steps(
    cp: int, seq_len: int, window: int | None, documents: bool, b: int, q: int, kv: int, compute: int, rate: float,
    hbm: float,
) -> tuple[float, ...]:  # fmt: skip
    c = seq_len // (2 * cp)
    mask_rows = b if documents else 1

    def pair_seconds(diagonal: bool, masked: bool) -> float:
        flops = 4 * b * c * c * q / (2 if diagonal and not masked else 1)
        moved = c * b * (2 * q + 2 * kv) * compute + (2 * mask_rows * c * c * compute if masked else 0)
        return max(flops / rate, moved / hbm)

    per_rank = [
        tuple(
            sum(pair_seconds(*pair) for pair in _pairs(cp, seq_len, r, (r - step) % cp, window, documents))
            for step in range(cp)
        )
        for r in range(cp)
    ]
    return max(per_rank, key=sum)


def cp_ring_seconds(placement: Placement, hw: Hardware, window: int | None = None) -> tuple[float, float]:
    """(exposed, overlapped) seconds of one block's CP ring per micro-batch (megaolmo.parallel.context).

    Forward: step i < cp - 1 sends the k, v buffer while its pairs compute. Backward (ATTENTION_BACKWARD
    forwards a step): step i sends k, v again (i < cp - 1) and the fp32 dk, dv accumulator of step i - 1
    (i > 0), both under step i's pairs; the last accumulator goes home with nothing to overlap. What a
    transfer takes beyond its step's compute is exposed; recompute runs the forward's ring again.
    """
    cp = placement.layout.cp
    if cp == 1:
        return 0.0, 0.0
    compute, _ = dtype_bytes(placement)
    link = hw.link_bytes_per_s(placement.cp_ring_span)
    kv = kv_buffer_elements(placement) * compute / link
    dkv = kv_buffer_elements(placement) * FP32 / link
    steps = ring_step_forwards(placement, hw, window)
    forward_exposed = sum(max(0.0, kv - step) for step in steps[:-1])
    backward_exposed = dkv  # the last hop home
    for i, step in enumerate(steps):
        transfer = (kv if i < cp - 1 else 0.0) + (dkv if i > 0 else 0.0)
        backward_exposed += max(0.0, transfer - ATTENTION_BACKWARD * step)
    exposed = (2 if ring_forward_repeats(placement) else 1) * forward_exposed + backward_exposed
    forward, backward = cp_bytes_per_layer(placement)
    return exposed, (forward + backward) / link - exposed


def _layer_forward(placement: Placement, hw: Hardware) -> tuple[float, float]:
    """(GEMM forward + backward, element-wise forward) seconds of one block (attention: `attention_forward`)."""
    layout, model = placement.layout, placement.model
    compute, residual = dtype_bytes(placement)
    tp, b, s, h = layout.tp, layout.micro_batch_size, placement.local_seq_len, model.d_model
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
    layout = placement.layout
    compute, _ = dtype_bytes(placement)
    gemm, elementwise = _layer_forward(placement, hw)
    layers = rank.layers
    # Attention per block: OLMo-3's sliding blocks cost less than its full ones (or more, under SDPA's mask).
    windows = [placement.windows[i] for i in placement.block_indices(rank)]
    distinct = set(windows)
    forwards = {window: attention_forward(placement, hw, window) for window in distinct}
    ring_times = {window: cp_ring_seconds(placement, hw, window) for window in distinct}
    attention = sum(forwards[window] for window in windows)
    rings = [ring_times[window] for window in windows]
    per_layer = {"none": 0.0, "selective": 0.0, "full": gemm / 3 + elementwise}
    tp_exposed = 1 - ASYNC_TP_HIDDEN if layout.async_tp else 1.0
    recompute = layers * per_layer[layout.activation_checkpointing]
    if layout.activation_checkpointing != "none":
        recompute += attention
    total_gemm = layers * gemm
    total_elementwise = layers * 3 * elementwise  # forward, and a backward moving twice the bytes
    if rank.last:
        tokens = placement.local_seq_len * layout.micro_batch_size
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
        pp=pp_bytes_per_microbatch(placement) / hw.link_bytes_per_s(layout.world_size),
        cp=sum(exposed for exposed, _ in rings),
        cp_overlapped=sum(hidden for _, hidden in rings),
    )


def _exposed(placement: Placement, rank: PipelineRank, hw: Hardware, flows: list[Traffic], busy: float):
    """Communication the step waits for, beyond what runs under compute (see the module docstring)."""
    layout = placement.layout
    compute, _ = dtype_bytes(placement)
    exposed = {}
    flow = {f.kind: f for f in flows}
    if "dp_gather" in flow:
        passes, _ = dp_gathers_per_step(placement)
        block = compute * placement.block_params * ring(layout.shard_degree) / flow["dp_gather"].bytes_per_second
        exposed["DP all-gather"] = max(passes * block, flow["dp_gather"].seconds - busy)
    if "dp_scatter" in flow:
        scatter = flow["dp_scatter"]
        unit = FP32 * max(placement.block_params, placement.root_params(rank)) * ring(layout.shard_degree)
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
