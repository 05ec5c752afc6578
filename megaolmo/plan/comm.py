"""Bytes each GPU sends per training step, per kind of parallelism, and the time they take on the links.

Ring collectives over g ranks: an all-gather or reduce-scatter of a tensor of
N bytes (the whole, gathered size) sends N (g - 1) / g bytes from every GPU, an
all-reduce twice that. The mesh is ("pp", "dp", "cp", "tp") with tp fastest
(parallel/mesh.py): a group runs at NVLink speed when its ranks fit in one node,
else at the network's. A CP ring spans tp x cp consecutive ranks; FSDP shards,
gathers and reduces over the dp x cp ranks of a (pp, tp) coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass

from megaolmo.plan.hardware import Hardware
from megaolmo.plan.layout import PipelineRank, Placement
from megaolmo.plan.memory import FP32, dtype_bytes, kv_buffer_elements


def ring(size: int) -> float:
    """Fraction of a gathered tensor each rank sends in a ring all-gather or reduce-scatter."""
    return (size - 1) / size


@dataclass(frozen=True)
class Traffic:
    """Bytes one GPU sends for one kind of communication, and the bandwidth that carries them."""

    kind: str  # tp | pp | cp | dp_gather | dp_scatter | tied
    name: str
    bytes_per_step: float
    bytes_per_second: float
    group: str  # which ranks, in words

    @property
    def seconds(self) -> float:
        return self.bytes_per_step / self.bytes_per_second if self.bytes_per_step else 0.0


def activation_bytes(placement: Placement) -> float:
    """One micro-batch's [s, b, h] activation over the whole sequence (s / cp tokens of it under CP), in the
    compute dtype."""
    compute, _ = dtype_bytes(placement)
    return placement.local_seq_len * placement.layout.micro_batch_size * placement.model.d_model * compute


def tp_bytes_per_microbatch(placement: Placement, rank: PipelineRank) -> float:
    """TP collectives of one micro-batch through this rank's layers, forward and backward.

    With SP, each sublayer (attention, MLP) all-gathers its input and reduce-scatters its output in forward;
    backward mirrors both and all-gathers the input again for the weight gradient (3 per direction + 1).
    Without SP, each sublayer all-reduces its output in forward and its input gradient in backward.
    Full recompute runs the forward's collectives again in backward. OLMo-2/3 add small ones: QK-norm sums
    the squares of each token's q and of its k over the heads of the TP group, an all-reduce of [s, b, 1]
    fp32 each, forward and backward (`qk_norm_bytes_per_layer`); under SP the norm weights' gradients are
    all-reduced too (`norm_weight_bytes`).
    """
    layout = placement.layout
    tp = layout.tp
    if tp == 1:
        return 0.0
    act = activation_bytes(placement)
    recompute = layout.activation_checkpointing == "full"
    qk_norm = qk_norm_bytes_per_layer(placement)
    norms = norm_weight_bytes(placement, rank)
    if layout.sequence_parallel:
        forward, backward = 4, 6  # gathers/scatters per layer
        per_layer = (forward + backward + (forward if recompute else 0)) * ring(tp) * act
        embedding = 2 * ring(tp) * act  # reduce-scatter forward, all-gather backward
        head = (2 if placement.model.weight_tying else 3) * ring(tp) * act  # + the head's regather
    else:
        forward, backward = 2, 2  # all-reduces per layer
        per_layer = (forward + backward + (forward if recompute else 0)) * 2 * ring(tp) * act
        embedding = 2 * ring(tp) * act  # all-reduce forward
        head = 2 * ring(tp) * act  # all-reduce of the input gradient
    tokens = placement.local_seq_len * layout.micro_batch_size
    loss = 3 * 2 * ring(tp) * tokens * FP32  # max, sum of exp and target logit over the vocabulary shards
    per_layer += qk_norm
    ends = (embedding if rank.first else 0.0) + (head + loss if rank.last else 0.0)
    return rank.layers * per_layer + ends + norms


def qk_norm_collectives(placement: Placement) -> int:
    """QK-norm's all-reduces per block per micro-batch under TP: q's and k's sums of squares forward, their
    gradients backward, and the forward's again under full recompute."""
    layout = placement.layout
    if layout.tp == 1 or not placement.model.qk_norm:
        return 0
    return 2 * (2 + (layout.activation_checkpointing == "full"))


def qk_norm_bytes_per_layer(placement: Placement) -> float:
    """Bytes one GPU sends for QK-norm in one block per micro-batch: all-reduces of [s, b, 1] fp32."""
    tokens = placement.local_seq_len * placement.layout.micro_batch_size
    return qk_norm_collectives(placement) * 2 * ring(placement.layout.tp) * tokens * FP32


def norm_weight_bytes(placement: Placement, rank: PipelineRank) -> float:
    """Under SP each TP rank normalizes another part of the sequence with the same RMSNorm weight, so every
    backward all-reduces those weights' gradients (attn_norm and ff_norm per block, ln_f on the last stage)."""
    layout, model = placement.layout, placement.model
    if layout.tp == 1 or not layout.sequence_parallel or not model.norm_after:
        return 0.0
    compute, _ = dtype_bytes(placement)
    norms = 2 * rank.layers + int(rank.last)
    return norms * 2 * ring(layout.tp) * model.d_model * compute


def ring_forward_repeats(placement: Placement) -> bool:
    """Whether backward runs the ring's forward again: under full recompute (the block) and selective recompute
    (the attention core, which is the ring)."""
    return placement.layout.activation_checkpointing != "none"


def cp_bytes_per_layer(placement: Placement) -> tuple[float, float]:
    """(forward, backward) bytes one rank sends around the CP ring per block per micro-batch.

    The ring passes the k, v buffer [2, b, kv_heads / tp, s / cp, hd] in the compute dtype on cp - 1 times in
    forward. Backward passes it on cp - 1 times again, and the fp32 dk, dv accumulator (as many elements) cp
    times: it travels with k and v and finally returns to its owner. Recompute adds the forward's ring again
    (`ring_forward_repeats`), counted in backward.
    """
    cp = placement.layout.cp
    if cp == 1:
        return 0.0, 0.0
    compute, _ = dtype_bytes(placement)
    kv = kv_buffer_elements(placement)
    forward = (cp - 1) * kv * compute
    backward = (cp - 1) * kv * compute + cp * kv * FP32
    return forward, backward + (forward if ring_forward_repeats(placement) else 0.0)


def cp_bytes_per_microbatch(placement: Placement, rank: PipelineRank) -> float:
    """CP ring bytes of one micro-batch through this rank's blocks, forward and backward."""
    return rank.layers * sum(cp_bytes_per_layer(placement))


def pp_bytes_per_microbatch(placement: Placement) -> float:
    """Activations sent forward and gradients sent back by a middle pipeline rank for one micro-batch:
    [s / tp if SP, b, h] per boundary of each of its vp stage modules."""
    layout = placement.layout
    if layout.pp == 1:
        return 0.0
    shard = activation_bytes(placement) / (layout.tp if layout.sequence_parallel else 1)
    return 2 * layout.vp * shard


def dp_gathers_per_step(placement: Placement) -> tuple[float, float]:
    """How often per step FSDP all-gathers each block and the root unit of a rank (tests/test_zero2.py counts).

    ZeRO-2 gathers each unit once per step: without PP the engine keeps the gathered weights from one
    micro-batch to the next (set_reshard_after_backward), and torch pipelining keeps them until its final
    reduce. ZeRO-3 reshards each unit after its forward, the root too (data_parallel.py passes
    reshard_after_forward=True explicitly, which overrides FSDP's default of keeping the root), and without
    PP also after each backward: two gathers per micro-batch. Under torch pipelining a backward leaves its
    units gathered until the next forward has used them, so the first forward gathers and so does whatever
    follows each forward (a forward or a backward): m + 1 per step, whatever the schedule.
    """
    layout, m = placement.layout, placement.n_microbatches
    if not layout.reshard_after_forward:
        return 1, 1
    passes = 2 * m if layout.pp == 1 else m + 1
    return passes, passes


def traffic(placement: Placement, rank: PipelineRank, hw: Hardware) -> list[Traffic]:
    """Every kind of communication of this pipeline rank in one step."""
    layout, m = placement.layout, placement.n_microbatches
    compute, _ = dtype_bytes(placement)
    tp, dp, pp, cp = layout.tp, layout.dp, layout.pp, layout.cp
    shard = layout.shard_degree  # FSDP2's dp x cp ranks
    shard_group = f"{dp} x {cp} (dp x cp) GPUs" if cp > 1 else f"{dp} GPUs"
    out = [
        Traffic(
            "tp",
            "TP (per sublayer " + ("all-gather + reduce-scatter" if layout.sequence_parallel else "all-reduce") + ")",
            m * tp_bytes_per_microbatch(placement, rank),
            hw.link_bytes_per_s(tp),
            f"{tp} GPUs",
        ),
        Traffic(
            "pp",
            "PP p2p (activations forward, gradients back)",
            m * pp_bytes_per_microbatch(placement),
            hw.link_bytes_per_s(tp * cp * dp * pp),
            "neighbouring stages",
        ),
    ]
    if cp > 1:
        out.append(
            Traffic(
                "cp",
                "CP ring (k, v forward; k, v + fp32 dk, dv backward)",
                m * cp_bytes_per_microbatch(placement, rank),
                hw.link_bytes_per_s(placement.cp_ring_span),
                f"{cp} GPUs (ring)",
            )
        )
    if shard > 1:
        block_gathers, root_gathers = dp_gathers_per_step(placement)
        block_bytes = placement.block_params * compute
        precision = "bf16" if placement.work.bf16 else "fp32"
        if placement.work.fp8_all_gather:  # float8 linears, one byte each (every block's, as the planner assumes)
            block_bytes -= placement.block_linear_params * (compute - 1)
            precision = f"FP8 block + {precision} other"
        blocks = rank.layers * block_bytes
        gathered = (block_gathers * blocks + root_gathers * placement.root_params(rank) * compute) * ring(shard)
        name = f"DP all-gather of {precision} weights ({block_gathers:g} pass{'es' if block_gathers != 1 else ''})"
        out.append(Traffic("dp_gather", name, gathered, hw.link_bytes_per_s(tp * cp * dp), shard_group))
        scattered = FP32 * placement.unsharded_params(rank) * ring(shard)
        out.append(
            Traffic(
                "dp_scatter",
                "DP reduce-scatter of fp32 gradients",
                scattered,
                hw.link_bytes_per_s(tp * cp * dp),
                shard_group,
            )
        )
    if placement.model.weight_tying and pp > 1 and (rank.first or rank.last):
        rows, d = placement.embedding_shape
        tied = FP32 * -(-rows // shard) * d  # all-reduce of 2 ranks: each sends its whole (sharded) gradient
        link = hw.link_bytes_per_s(tp * cp * dp * pp)
        out.append(Traffic("tied", "tied embedding all-reduce", tied, link, "first + last stage"))
    return out
