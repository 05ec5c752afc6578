"""The planner's text: one plan in full, a ranked table of plans, and the one-line refusal of a layout."""

from __future__ import annotations

from megaolmo.plan import Plan
from megaolmo.plan.hardware import GIB
from megaolmo.plan.memory import (
    FP32,
    block_activation_terms,
    checkpoint_share,
    checkpoint_transient,
    dtype_bytes,
    logits_bytes,
    loss_backward_bytes,
)
from megaolmo.tables import format_table as rows_table

MIB = 2**20


def _gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def _memory_budget(plan: Plan) -> str:
    hw = plan.hardware
    reserve = hw.capacity_bytes - hw.memory_bytes
    return f"{_gib(hw.memory_bytes)} usable ({_gib(hw.capacity_bytes)} - {_gib(reserve)} reserve)"


def refusal(plan: Plan) -> str:
    """One line: the layout, its peak and how far over the device's memory it is."""
    worst = plan.worst
    over = plan.peak_bytes - plan.hardware.memory_bytes
    return (
        f"layout {plan.layout.describe()} does not fit: pipeline rank {worst.rank.pp_rank} needs "
        f"{_gib(plan.peak_bytes)} per GPU at '{worst.peak.name}', {_gib(over)} "
        f"({over / plan.hardware.memory_bytes:.0%}) over the {_memory_budget(plan)}"
    )


def _count(n: float, unit: str) -> str:
    """1.18B parameters, 3.3M parameters, 1 rank, 8 ranks."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B {unit}s"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M {unit}s"
    return f"{n:,.0f} {unit}" + ("s" if n != 1 else "")


def _header(plan: Plan, title: str) -> list[str]:
    placement, hw = plan.placement, plan.hardware
    work, layout, model = placement.work, plan.layout, placement.model
    nodes = f"{_count(hw.nodes, 'node')} x {hw.devices_per_node} {hw.device_name}"
    return [
        f"plan: {title}, {_count(model.num_params(), 'parameter')}, on {nodes} ({hw.name}): "
        + _count(layout.world_size, "rank"),
        f"layout: {layout.describe()}",
        (
            f"batch: {work.global_batch_size} sequences x {work.seq_len} tokens = "
            f"{_count(work.tokens_per_step, 'token')} per step; {placement.n_microbatches} micro-batches per DP rank; "
            f"{'bf16' if work.bf16 else 'fp32'} compute, {work.kernels} kernels, {model.attention} attention"
            + (", document masking" if work.document_masking else "")
        ),
        *(
            [
                f"context parallelism: cp{layout.cp}, each rank holds {placement.local_seq_len} tokens of every "
                f"sequence (2 zig-zag chunks of {work.seq_len // (2 * layout.cp)}); the ring spans "
                f"{placement.cp_ring_span} consecutive ranks ("
                + ("within a node" if placement.cp_ring_span <= hw.devices_per_node else "across nodes")
                + f"); FSDP shards over dp x cp = {layout.shard_degree} ranks"
            ]
            if layout.cp > 1
            else []
        ),
    ]


def _in_flight(plan: Plan) -> str:
    """How many micro-batches the first stage holds, and the schedule's formula for it."""
    placement = plan.placement
    layout, m = placement.layout, placement.n_microbatches
    first = plan.memory[0]
    blocks = first.rank.layers // layout.vp
    if layout.pp == 1:
        formula = "one at a time (gradient accumulation)"
    elif layout.pp_schedule == "gpipe":
        formula = "GPipe: all m"
    elif layout.vp == 1:
        formula = f"1F1B: min(m, pp) = min({m}, {layout.pp})"
    else:
        formula = (
            f"interleaved: (vp - 1) pp + 2 (pp - 1) + 1 = pp vp (1 + (pp - 1) / (pp vp)) = "
            f"{layout.pp * layout.vp} x {1 + (layout.pp - 1) / (layout.pp * layout.vp):.3f}"
        )
    chunks = first.microbatches_in_flight
    return (
        f"  first stage: {chunks} micro-batch chunk{'' if chunks == 1 else 's'} of {blocks} blocks in flight "
        f"({formula})"
    )


def _memory(plan: Plan) -> list[str]:
    placement, worst = plan.placement, plan.worst
    layout, work = placement.layout, placement.work
    peak = worst.peak
    lines = [
        "",
        f"memory per device, worst stage: pipeline rank {worst.rank.pp_rank} of {layout.pp}, peak at '{peak.name}'",
    ]
    for name, value in peak.items.items():
        if value:
            lines.append(f"  {name:<64} {_gib(value):>11}")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'peak':<64} {_gib(peak.total):>11}  of {_memory_budget(plan)}: {verdict}")
    for moment in worst.moments:
        if moment is not peak:
            lines.append(f"  (at '{moment.name}': {_gib(moment.total)})")
    if layout.pp > 1:
        ranks = ", ".join(f"{r.rank.pp_rank}: {r.peak.total / GIB:.1f}" for r in plan.memory)
        lines.append(f"  peak per pipeline rank (GiB): {ranks}")
    lines.append(_in_flight(plan))
    lines.append(
        f"  checkpoint: this rank writes and reads {_gib(checkpoint_share(placement, worst.rank)).strip()} (its "
        f"shards of the fp32 weights and AdamW moments), adding {_gib(checkpoint_transient(placement, worst.rank)).strip()} "
        "of host memory (one saved chunk at a time) and nothing on the GPU"
    )
    if work.loss_chunk_tokens is None:
        lines.append(
            f"  last stage: logits {logits_bytes(placement) / MIB:.1f} MiB and the loss's fp32 softmax "
            f"{logits_bytes(placement, FP32) / MIB:.1f} MiB per micro-batch"
        )
    else:
        lines.append(
            f"  last stage: the loss forms {work.loss_chunk_tokens} tokens' logits at a time; its backward holds "
            f"{loss_backward_bytes(placement) / MIB:.1f} MiB (whole logits in fp32: {logits_bytes(placement, FP32) / MIB:.1f} MiB)"
        )
    sbh = placement.local_seq_len * layout.micro_batch_size * placement.model.d_model / layout.tp
    lines.append(
        f"  activations per block per micro-batch: {worst.activation_per_layer / MIB:.1f} MiB = "
        f"{worst.activation_per_layer / sbh:.1f} s*b*h/tp bytes"
        + (f" (s = {placement.local_seq_len}, this CP rank's tokens)" if layout.cp > 1 else "")
        + " (Korthikanti et al. 2022, megaolmo's terms):"
    )
    for name, value in block_activation_terms(placement).items():
        lines.append(f"    {name:<60} {value / sbh:6.2f} s*b*h/tp")
    return lines


def _communication(plan: Plan) -> list[str]:
    lines = ["", f"communication per device per step (pipeline rank {plan.step.rank.pp_rank}, bytes sent):"]
    flows = [flow for flow in plan.step.traffic if flow.bytes_per_step]
    for flow in flows:
        lines.append(
            f"  {flow.name:<52} {_gib(flow.bytes_per_step):>12}  over {flow.group} at "
            f"{flow.bytes_per_second / 1e9:.0f} GB/s: {flow.seconds:.3f} s"
        )
    return lines if flows else [*lines, "  none (one rank)"]


def _time(plan: Plan) -> list[str]:
    step, layout, placement = plan.step, plan.layout, plan.placement
    micro = step.microbatch
    m = step.n_microbatches
    lines = [
        "",
        (
            f"pipeline bubble: (pp - 1) / (vp x m) = {layout.pp - 1} / ({layout.vp} x {m}) = "
            f"{placement.bubble_fraction():.2%}"
        ),
        "",
        f"step time (roofline), slowest pipeline rank {step.rank.pp_rank}:",
        (
            f"  per micro-batch t_mb = {micro.total * 1e3:.2f} ms: GEMMs {micro.gemm * 1e3:.2f}, attention "
            f"{micro.attention * 1e3:.2f}, element-wise {micro.elementwise * 1e3:.2f}, recompute "
            f"{micro.recompute * 1e3:.2f}, TP {micro.tp * 1e3:.2f}, PP p2p {micro.pp * 1e3:.2f}"
            + (f", CP ring {micro.cp * 1e3:.2f}" if layout.cp > 1 else "")
        ),
        *(
            [
                (
                    f"  CP ring per micro-batch: {micro.cp * 1e3:.2f} ms exposed, {micro.cp_overlapped * 1e3:.2f} ms "
                    f"hidden under the attention blocks (cp{layout.cp}, {m * micro.cp:.3f} s exposed per step)"
                )
            ]
            if layout.cp > 1
            else []
        ),
        f"  m x t_mb                      {m * micro.total:9.3f} s",
        f"  bubble (pp - 1) x t_mb / vp   {step.bubble:9.3f} s",
    ]
    for name, seconds in step.exposed.items():
        lines.append(f"  exposed {name:<22}{seconds:9.3f} s")
    tokens = placement.work.tokens_per_step
    lines += [
        f"  optimizer step + clipping     {step.optimizer:9.3f} s",
        f"  step                          {step.seconds:9.3f} s  ({tokens / step.seconds:,.0f} tokens/s)",
        (
            f"  MFU {step.mfu:.1%} (megaolmo.model.flops.flops_per_token: {placement.work.model_flops_per_step:.3e} "
            f"FLOPs per step over {layout.world_size} x {plan.hardware.peak_flops / 1e12:.4g} TFLOP/s)"
        ),
    ]
    return lines


def _assumptions(plan: Plan) -> list[str]:
    hw, placement = plan.hardware, plan.placement
    compute, _ = dtype_bytes(placement)
    peak = f"{hw.peak_flops / 1e12:.4g} TFLOP/s" + (" (measured here with a matmul)" if hw.peak_measured else "")
    return [
        "",
        "assumptions (the roofline):",
        (
            f"  GEMMs and flash attention: max(FLOPs / ({peak} x {hw.matmul_efficiency:.2f} matmul efficiency), "
            f"bytes / {hw.hbm_bytes_per_s / 1e9:.0f} GB/s HBM), {compute}-byte operands; backward = 2 GEMMs per GEMM, "
            "flash backward = 2.5 forwards, causal attention = half the s^2 FLOPs, a sliding window its band "
            "(flash-attn) or all s^2 (SDPA's mask)"
        ),
        (
            "  element-wise ops (norms, QK-norm, RoPE, SwiGLU, residual adds, SDPA layout copies, loss) move their "
            "bytes at HBM bandwidth; backward moves twice the forward's"
        ),
        (
            f"  collectives: rings, N (g - 1) / g bytes per GPU (all-reduce twice), no latency term; intra-node "
            f"{hw.intra_node_bytes_per_s / 1e9:.0f} GB/s when the group fits in a node of {hw.devices_per_node}, "
            f"else the network {hw.inter_node_bytes_per_s / 1e9:.0f} GB/s per GPU; mesh (pp, dp, cp, tp), tp fastest"
        ),
        (
            "  exposed: TP collectives and pipeline sends (in t_mb); FSDP all-gathers overlap compute but for the "
            "first block of each pass; reduce-scatters overlap the last backward but for one unit (pp = 1) or not at "
            "all (pp > 1: torch pipelining reduces after the last micro-batch); tied-embedding all-reduce"
        ),
        *(
            [
                (
                    "  CP ring: each step's k, v transfer (backward: with the fp32 dk, dv accumulator) overlaps that "
                    "step's attention pairs, the excess exposed; the accumulator's last hop is exposed; recompute "
                    "runs the forward ring again"
                )
            ]
            if placement.layout.cp > 1
            else []
        ),
        "  optimizer: AdamW and clipping read and write weights, gradients and moments at HBM bandwidth",
    ]


def format_plan(plan: Plan, title: str) -> str:
    """The full plan of one layout."""
    lines = _header(plan, title) + _memory(plan) + _communication(plan) + _time(plan) + _assumptions(plan)
    return "\n".join(lines)


def format_table(plans: list[Plan], title: str, top: int, candidates: int) -> str:
    """The `top` fastest feasible layouts as a table."""
    if not plans:
        return f"no feasible layout among {candidates} candidates for {title}"
    lines = _header(plans[0], title)[:1]
    lines.append(f"{len(plans)} feasible layouts of {candidates} candidates; the {min(top, len(plans))} fastest:")
    rows = []
    for i, plan in enumerate(plans[:top], 1):
        layout = plan.layout
        rows.append({
            "#": i, "tp": layout.tp, "sp": "y" if layout.sequence_parallel else "n", "cp": layout.cp, "pp": layout.pp,
            "vp": layout.vp, "dp": layout.dp, "mbs": layout.micro_batch_size,
            "recompute": layout.activation_checkpointing,
            "zero": "-" if layout.shard_degree == 1 else ("3" if layout.reshard_after_forward else "2"),
            "bubble": f"{plan.placement.bubble_fraction():.1%}", "peak GiB": f"{plan.peak_bytes / GIB:.1f}",
            "step s": f"{plan.step.seconds:#.3g}", "MFU": f"{plan.step.mfu:.1%}",
        })  # fmt: skip
    return "\n".join([*lines, rows_table(rows)])
