"""Per-device memory of a layout, term by term as megaolmo allocates it.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation
in Large Transformer Models"), but the terms are megaolmo's own, read off
model/olmo.py, the kernels and the TP layers rather than Megatron's 34 s b h:

- each LayerNorm keeps its input in fp32 and its output (torch reference), or
  only its output (Triton kernel), plus fp32 row statistics; under sequence
  parallelism on s / tp rows. The column-parallel linear after it keeps only
  that sequence shard and gathers again in backward.
- OLMo-2/3 normalize each sublayer's output instead: att_proj and ff_proj keep
  the residual stream itself, and each RMSNorm keeps the sublayer's output
  (Triton) or its fp32 copy and the normalized output (torch), plus rstd.
  QK-norm keeps q and k (views that hold all of qkv, when the kernel or fp32
  keeps its input) or, on the torch path (and always under TP, where the
  statistic is all-reduced), their fp32 copies and normalized values.
- OLMo-3's sliding blocks under SDPA pass a boolean [s, s] mask, which SDPA
  turns into a bias in the compute dtype and keeps; flash-attn keeps nothing.
- attention keeps the contiguous q, k, v it hands to SDPA, SDPA's output and
  fp32 logsumexp, and the [s, b, h] copy of the output for attn_out (a view
  when the batch is 1 and the output is already [b, s, heads, hd]); flash-attn
  keeps the RoPE'd q, k and v, a view that holds all of qkv. Selective
  recompute keeps the checkpoint's inputs (q, k, and qkv via v) instead.
- the MLP keeps ff_proj's output (2F) and the SwiGLU output (F); the torch
  SwiGLU also keeps silu(gate) (F).
- full recompute keeps each block's input and rebuilds one block in backward.
- with data.document_masking under SDPA every block gets a [b, 1, s, s] mask,
  kept as a bias in the compute dtype like a window's.
- context parallelism (parallel.cp) gives each rank s / cp tokens of every row
  (two zig-zag chunks): every activation above, the logits and the loss are
  those of s / cp tokens. Ring attention keeps what SDPA keeps on one process
  (q, k, v, the output and the logsumexp) and no mask: each ring step rebuilds
  its block's mask from token indices and document ids, a transient of
  b (s / cp)^2 in the compute dtype at most, beside the k, v buffers in flight
  and the fp32 dk, dv accumulator that travels with them in backward.

Weights, gradients and optimizer states follow FSDP2 as
torch.distributed.fsdp._fully_shard does it, in every multi-rank run (over a
DP mesh of one rank when dp == 1): fp32 master weights, states and reduced
gradients sharded over DP (over DP and CP together, dp x cp ranks, under
context parallelism); copies in the compute dtype gathered per block (all
kept for the whole step with reshard_after_forward=False: from forward to
backward, and from one micro-batch to the next); with gradient
accumulation an unsharded fp32 accumulated gradient per parameter; and under
torch.distributed.pipelining (pp > 1) no reduce-scatter until the last
micro-batch. One process has no FSDP: fp32 weights and gradients, and in bf16
the copies of every weight it casts for a forward, FSDP's mixed precision
without the sharding.

The peak is the largest of a few moments of the step: the first backward (the
most micro-batches in flight, no gradients yet), the steady state (gradients
accumulated too), the optimizer step (with AdamW's temporaries) and a
checkpoint save or resume (the training state and what DCP reads through).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megaolmo.plan.layout import PipelineRank, Placement

FP32, BF16 = 4, 2
STAT = 4  # one fp32 number per row (LayerNorm mean or rstd, attention logsumexp)


@dataclass
class Moment:
    """The bytes alive at one point of the step, by what they are."""

    name: str
    items: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.items.values())


@dataclass
class RankMemory:
    """The memory of one pipeline rank: its peak is the largest of its moments."""

    rank: PipelineRank
    moments: list[Moment]
    activation_per_layer: float  # bytes per block per micro-batch
    microbatches_in_flight: int  # forward chunks alive at the peak (first stage: the most)

    @property
    def peak(self) -> Moment:
        return max(self.moments, key=lambda moment: moment.total)


def dtype_bytes(placement: Placement) -> tuple[int, int]:
    """(compute, residual stream) bytes per element: the residual stream flows in the compute dtype on every
    layout (FSDP's mixed precision, which one process applies too)."""
    compute = BF16 if placement.work.bf16 else FP32
    return compute, compute


def _norm_rows(placement: Placement) -> int:
    """Tokens of the norm regions on this rank: the sequence shard under SP, else the whole sequence."""
    layout, s = placement.layout, placement.local_seq_len
    return (s // layout.tp if layout.sequence_parallel else s) * layout.micro_batch_size


def _sliding(placement: Placement) -> int:
    """Blocks whose window is shorter than the sequence (OLMo-3's sliding layers); the others are causal."""
    seq_len = placement.work.seq_len
    return sum(1 for window in placement.windows if window is not None and window < seq_len)


def window_mask_bias(placement: Placement) -> bool:
    """Whether sliding blocks run SDPA with a boolean [s, s] mask, which SDPA turns into an additive bias in
    the compute dtype at every call and keeps for backward (flash-attn takes the window as two numbers).
    Under context parallelism the ring rebuilds each block's mask from token indices: nothing is kept."""
    model = placement.model
    return model.attention == "sdpa" and placement.layout.cp == 1 and _sliding(placement) > 0


def document_mask_bias(placement: Placement) -> bool:
    """Whether every block runs SDPA with a [b, 1, s, s] document mask (data.document_masking), kept as a bias in
    the compute dtype for backward; flash-attn's variable-length kernel and the CP ring keep none."""
    work, model = placement.work, placement.model
    return work.document_masking and model.attention == "sdpa" and placement.layout.cp == 1


def ring_backward_bytes(placement: Placement) -> float:
    """What ring attention holds at once in one block's backward (cp > 1): the fp32 dq, the k, v buffer it
    computes with and the one arriving, the fp32 dk, dv accumulator and the one arriving, and, with document
    masking or a window, one pair's mask [b, 1, c, c] (c = s / (2 cp), a chunk), boolean and as a bias in the
    compute dtype, rebuilt from token indices."""
    layout, model = placement.layout, placement.model
    if layout.cp == 1:
        return 0.0
    compute, _ = dtype_bytes(placement)
    kv = kv_buffer_elements(placement)
    dq = FP32 * placement.local_seq_len * layout.micro_batch_size * model.n_heads * model.head_dim // layout.tp
    masked = placement.work.document_masking or _sliding(placement) > 0
    rows = layout.micro_batch_size if placement.work.document_masking else 1
    chunk = placement.work.seq_len // (2 * layout.cp)
    mask = rows * chunk**2 * (compute + 1) if masked else 0
    return dq + 2 * kv * compute + 2 * kv * FP32 + mask


def kv_buffer_elements(placement: Placement) -> int:
    """Elements of the ring's k, v buffer [2, b, kv_heads / tp, s / cp, hd]: what one ring step passes on."""
    layout, model = placement.layout, placement.model
    return 2 * layout.micro_batch_size * placement.local_seq_len * model.kv_heads // layout.tp * model.head_dim


def _norm_terms(placement: Placement) -> dict[str, float]:
    """The block's two norms and what the linears after them keep, by generation and kernel."""
    work, model = placement.work, placement.model
    rows, h = _norm_rows(placement), model.d_model
    compute, residual = dtype_bytes(placement)
    if not model.norm_after:  # OLMo-1: the norm's output is the linear's input, kept once
        if work.kernels == "triton":  # keeps its output (which the next linear shares) and rstd
            return {"2 LayerNorms: output, rstd": 2 * rows * (residual * h + STAT)}
        # F.layer_norm on x.float() keeps that fp32 input; the output in the compute dtype feeds the linear
        return {"2 LayerNorms: fp32 input, output, mean, rstd": 2 * rows * ((FP32 + compute) * h + 2 * STAT)}
    # OLMo-2/3: att_proj and ff_proj read the residual stream itself (the block input, then x + attention),
    # and each norm after a sublayer keeps the sublayer's output, a tensor nothing else holds.
    terms = {"att_proj, ff_proj inputs (the residual stream)": 2 * rows * residual * h}
    if work.kernels == "triton":  # the kernel keeps its input and rstd
        terms["2 RMSNorms after attention, MLP: input, rstd"] = 2 * rows * (compute * h + STAT)
    else:  # the reference keeps x in fp32 (x itself in fp32), the normalized x before the weight, and rstd
        terms["2 RMSNorms after attention, MLP: fp32 input, normalized, rstd"] = (
            2 * rows * ((FP32 + compute) * h + STAT)
        )
    return terms


def _qk_norm_terms(placement: Placement) -> dict[str, float]:
    """What QK-norm keeps: the RMSNorms of the whole projected q and k (before RoPE).

    q and k are views of att_proj's output: a kernel (or an fp32 `.float()`, a no-op) that keeps its input
    keeps all of qkv alive. The torch path (the reference, and
    the TP norm whose statistic is all-reduced over heads) keeps an fp32 copy in bf16 and the normalized
    q and k before the weight; every path keeps one fp32 rstd per token for each.
    """
    work, layout, model = placement.work, placement.layout, placement.model
    tokens = placement.local_seq_len * layout.micro_batch_size
    q, kv = model.n_heads * model.head_dim // layout.tp, model.kv_heads * model.head_dim // layout.tp
    compute, _ = dtype_bytes(placement)
    torch_path = work.kernels != "triton" or layout.tp > 1
    terms: dict[str, float] = {}
    if not torch_path or compute == FP32:
        terms["QK-norm inputs: views that hold qkv"] = tokens * (q + 2 * kv) * compute
    if torch_path:
        if compute != FP32:
            terms["QK-norm fp32 copies of q, k"] = tokens * (q + kv) * FP32
        terms["QK-norm normalized q, k"] = tokens * (q + kv) * compute
    terms["QK-norm rstd (q, k)"] = 2 * tokens * STAT
    return terms


def block_activation_terms(placement: Placement, recompute: str | None = None) -> dict[str, float]:
    """Bytes one block keeps for backward per micro-batch on one rank, by term (averaged over the blocks
    where they differ: OLMo-3's sliding blocks under SDPA keep a mask bias that full blocks do not)."""
    work, layout, model = placement.work, placement.layout, placement.model
    recompute = recompute or layout.activation_checkpointing
    s, b, h, tp = placement.local_seq_len, layout.micro_batch_size, model.d_model, layout.tp
    rows = _norm_rows(placement)
    tokens = s * b  # tokens of the TP regions (the whole sequence, or this CP rank's s / cp)
    q = model.n_heads * model.head_dim // tp  # this rank's query width
    kv = model.kv_heads * model.head_dim // tp
    ffn = model.ffn_hidden_size // tp
    compute, residual = dtype_bytes(placement)
    if recompute == "full":
        return {"block input (full recompute)": residual * rows * h}
    terms = _norm_terms(placement)
    # attn_out keeps its input: a view of the attention output, which the attention keeps anyway, when CPU's
    # SDPA writes it in the query's [s, b, heads, hd] order, or with a batch of 1 when the kernel writes
    # [b, s, heads, hd] (CUDA's SDPA, flash-attn); else a copy in [s, b, h]. Ring attention (cp > 1) stores its
    # output in [s / cp, b, heads, hd] order: a view.
    cpu_sdpa = work.device == "cpu" and model.attention == "sdpa"
    output_view = layout.cp > 1 or cpu_sdpa or (b == 1 and (work.device == "cuda" or model.attention == "flash"))
    if model.clip_qkv is not None:
        terms["qkv before clamp"] = tokens * (q + 2 * kv) * compute
    terms["q, k, v for SDPA"] = tokens * (q + 2 * kv) * compute  # RoPE's outputs and v's own copy
    if model.qk_norm:
        terms.update(_qk_norm_terms(placement))
    if recompute != "selective":
        terms["attention output, logsumexp"] = tokens * (q * compute + model.n_heads // tp * STAT)
        if document_mask_bias(placement):
            terms["document mask as a [b, s, s] SDPA bias"] = b * s * s * compute
        elif window_mask_bias(placement):
            sliding = _sliding(placement)
            terms[f"window mask as an [s, s] SDPA bias ({sliding} of {model.n_layers} blocks)"] = (
                sliding / model.n_layers * s * s * compute
            )
    if recompute == "selective" or not output_view:
        terms["attention output as [s, b, h] for attn_out"] = tokens * q * compute
    swiglu = 3 if work.kernels == "triton" else 4  # [up | gate] and the product; torch also keeps silu(gate)
    terms[f"ff_proj output, SwiGLU ({swiglu}F)"] = tokens * swiglu * ffn * compute
    return terms


def block_backward_bytes(placement: Placement) -> float:
    """Gradients alive at once inside one block's backward: at SwiGLU, those of its output (F) and input (2F)."""
    compute, _ = dtype_bytes(placement)
    tokens = placement.local_seq_len * placement.layout.micro_batch_size
    return 3 * tokens * placement.model.ffn_hidden_size // placement.layout.tp * compute


def logits_bytes(placement: Placement, dtype_bytes_: int | None = None) -> float:
    """One micro-batch's logits [b, s / cp, V / tp], in the compute dtype unless told otherwise."""
    compute, _ = dtype_bytes(placement)
    rows = placement.layout.micro_batch_size * placement.local_seq_len
    return rows * placement.embedding_shape[0] * (dtype_bytes_ or compute)


def final_norm_bytes(placement: Placement) -> float:
    """What ln_f keeps, its output (the head's input) included: one of OLMo-1's block LayerNorms; on OLMo-2/3
    the RMSNorm's own terms on the residual stream, plus its output, which the head keeps."""
    model, rows = placement.model, _norm_rows(placement)
    compute, residual = dtype_bytes(placement)
    if not model.norm_after:
        return next(iter(_norm_terms(placement).values())) / 2
    if placement.work.kernels == "triton":  # its input (the last residual) and rstd; the output for the head
        return rows * ((residual + compute) * model.d_model + STAT)
    return rows * ((FP32 + 2 * compute) * model.d_model + STAT)  # fp32 input, normalized, output, rstd


def head_activation_bytes(placement: Placement) -> float:
    """What the final norm, the head and the loss keep per micro-batch: the norm's terms, the gathered hidden
    states a tied head under SP keeps, and the loss's fp32 (log-)softmax, or with trainer.loss_chunk_tokens
    only each token's fp32 log-sum-exp (the logits are formed again in backward)."""
    norm = final_norm_bytes(placement)
    layout, work = placement.layout, placement.work
    compute, _ = dtype_bytes(placement)
    gathered = 0.0
    if placement.model.weight_tying and layout.sequence_parallel and layout.tp > 1:
        gathered = compute * placement.local_seq_len * layout.micro_batch_size * placement.model.d_model
    if work.loss_chunk_tokens is not None:
        return norm + gathered + FP32 * placement.local_seq_len * layout.micro_batch_size
    return norm + gathered + logits_bytes(placement, FP32)


def loss_backward_bytes(placement: Placement) -> float:
    """What the loss's backward holds at once: two fp32 gradients of the whole logits, or with
    trainer.loss_chunk_tokens one chunk's logits (in the compute dtype and upcast) and softmax, beside the
    head weight's gradient summed in fp32 over the chunks (and cast back) and the hidden states' gradient."""
    work = placement.work
    if work.loss_chunk_tokens is None:
        return 2 * logits_bytes(placement, FP32)
    compute, _ = dtype_bytes(placement)
    rows = placement.layout.micro_batch_size * placement.local_seq_len
    vocab_rows, d = placement.embedding_shape
    chunk = min(work.loss_chunk_tokens, rows) * vocab_rows
    chunk_terms = chunk * (2 * FP32 + (compute if compute != FP32 else 0))
    weight_grad = vocab_rows * d * (FP32 + compute)  # the fp32 sum and one chunk's GEMM (or the cast) beside it
    return chunk_terms + weight_grad + rows * d * compute


def _recompute_bytes(placement: Placement) -> float:
    """What backward rebuilds at once: a whole block (full) or one attention core (selective)."""
    recompute = placement.layout.activation_checkpointing
    if recompute == "none":
        return 0.0
    core = block_activation_terms(placement, "none")
    if recompute == "full":
        return sum(core.values())
    attention = ("q, k, v for SDPA", "attention output, logsumexp", "window mask as an", "document mask as a")
    return sum(value for key, value in core.items() if key.startswith(attention))


def _rank_memory(placement: Placement, rank: PipelineRank) -> RankMemory:
    layout, work = placement.layout, placement.work
    m = placement.n_microbatches
    unsharded, sharded = placement.unsharded_params(rank), placement.sharded_params(rank)
    block, root = placement.block_params, placement.root_params(rank)
    compute, residual = dtype_bytes(placement)
    per_layer = sum(block_activation_terms(placement).values())
    in_flight, _ = placement.microbatches_in_flight(rank)
    s = placement.local_seq_len
    hidden = (s // layout.tp if layout.sequence_parallel else s) * layout.micro_batch_size
    hidden *= placement.model.d_model
    # A chunk's activations; a stage that sends its output keeps it for backward (torch pipelining's fwd_cache).
    sends = layout.pp > 1 and not (rank.last and layout.vp == 1)
    per_chunk = rank.layers / layout.vp * per_layer + (residual * hidden if sends else 0.0)
    # Micro-batches whose loss is computed but not yet backpropagated when the first backward starts: torch
    # pipelining computes each loss right after the last stage's forward, and GPipe runs all forwards first.
    losses = (m if layout.pp > 1 and layout.pp_schedule == "gpipe" else 1) if rank.last else 0
    head = head_activation_bytes(placement)

    degree = layout.shard_degree
    over = f" over dp x cp = {layout.dp} x {layout.cp}" if layout.cp > 1 else ""
    shard = f", FSDP2-sharded 1/{degree}{over}" if degree > 1 else ""
    persistent = {
        f"weights (fp32 master{shard})": FP32 * sharded,
        f"optimizer states (2 fp32 AdamW moments{shard})": 2 * FP32 * sharded,
    }
    # olmo.sliding_window_mask's cache: bool [s, s] (document masks are built per micro-batch instead)
    if window_mask_bias(placement) and not work.document_masking and rank.layers:
        persistent["sliding-window mask (cached bool [s, s])"] = float(work.seq_len**2)
    if layout.pp > 1:  # torch pipelining allocates receive buffers for every micro-batch, in the param dtype
        modules = range(layout.vp)
        buffers = sum(int(i > 0 or not rank.first) + int(i < layout.vp - 1 or not rank.last) for i in modules)
        persistent[f"pipeline receive buffers ({buffers} x {m} micro-batches)"] = m * buffers * compute * hidden
    final = {f"gradients (fp32{shard})": FP32 * sharded}
    precision = "bf16" if work.bf16 else "fp32"
    if placement.fsdp:
        # ZeRO-3: the root unit, the running block and (dp > 1) the prefetched one, whose all-gather output is
        # allocated when it is issued; ZeRO-2 keeps every unit gathered for the whole step.
        blocks = 2 if layout.shard_degree > 1 else 1
        if layout.reshard_after_forward:
            gathered_key = f"gathered {precision} weights (ZeRO-3: root + {blocks} block{'s' if blocks > 1 else ''})"
            gathered = {gathered_key: compute * (root + blocks * block)}
        else:
            gathered = {f"gathered {precision} weights (ZeRO-2: all)": compute * unsharded}
        accumulates = layout.pp > 1 or m > 1  # an unsharded fp32 accumulated gradient per parameter
        if accumulates:
            grads = {"gradients (fp32, unsharded, accumulated over micro-batches)": FP32 * unsharded}
        else:
            grads = final
        unit = max(block, root)
        if layout.pp > 1:  # reduce-scatters wait for the last micro-batch: a unit's fresh grads before they add up
            unit_temporary = compute * unit if work.bf16 else FP32 * _largest_param(placement)
        else:  # the reduce-scatter input (fp32) of a unit, next to its fresh grads when nothing accumulates
            unit_temporary = FP32 * unit + (0 if accumulates else compute * unit)
    else:  # one process: the compute-dtype copies it casts for each forward live until its backward
        gathered = {f"{precision} weight copies (cast for the step)": compute * unsharded} if work.bf16 else {}
        grads = {"gradients (fp32)": FP32 * unsharded}
        unit_temporary = FP32 * _largest_param(placement)  # a new gradient before it is added to .grad
    if placement.model.linear == "te":  # cast to FP8 at a step's first micro-batch, reused by the others
        gathered = {**gathered, "FP8 weight casts (Transformer Engine, kept for the step)": rank.layers * block}
    # Inside a block's backward its activation gradients (and any recompute) are alive; the unit's gradient
    # temporaries come at its end, when the block's own activations are gone: one or the other. The loss's
    # backward makes two fp32 gradients of the logits (loss_backward_bytes).
    backward = max(
        block_backward_bytes(placement) + _recompute_bytes(placement) + ring_backward_bytes(placement), unit_temporary
    )
    if rank.last:
        backward = max(backward, loss_backward_bytes(placement))

    first_backward = Moment(
        "first backward, no gradients yet",
        {
            **persistent,
            **gathered,
            _activations(in_flight): in_flight * per_chunk + losses * head,
            "backward temporaries": backward,
        },
    )
    alive = in_flight if placement.gradients_alive_at_peak(rank) else in_flight - 1
    steady = Moment(
        "steady state, gradients accumulated",
        {
            **persistent,
            **gathered,
            **grads,
            _activations(alive): alive * per_chunk + min(alive, losses) * head,
            "backward temporaries": backward if alive else unit_temporary,
        },
    )
    step = Moment("optimizer step", {**persistent, **final, **optimizer_temporaries(placement, rank)})
    # A save comes after the step, a resume before the first one: the training state, and on a CPU device the
    # host memory DCP reads through (on a GPU the shards are written and read in place: nothing extra there).
    transient = checkpoint_transient(placement, rank) if work.device == "cpu" else 0.0
    save = Moment("checkpoint save or resume", {**persistent, **final, CHECKPOINT_TRANSIENT: transient})
    return RankMemory(rank, [first_backward, steady, step, save], per_layer, in_flight)


CHECKPOINT_TRANSIENT = "checkpoint transient (a saved chunk: its bytes and its tensor)"


def checkpoint_share(placement: Placement, rank: PipelineRank) -> float:
    """Bytes of the checkpoint this rank writes at a save and reads at a resume: its shards of the fp32
    weights and of both AdamW moments (sharded checkpoints keep each rank's share, nothing gathered)."""
    return 3 * FP32 * placement.sharded_params(rank)


def checkpoint_transient(placement: Placement, rank: PipelineRank) -> float:
    """Host memory a save or a resume adds on this rank: DCP reads one saved chunk at a time, its bytes
    (checked against the manifest's sha256) and the tensor made of them; at the saving layout a chunk is
    one of the rank's own shards. A save writes straight from the shards."""
    return 2 * FP32 * _largest_shard(placement, rank)


def _largest_shard(placement: Placement, rank: PipelineRank) -> int:
    """Elements of this rank's largest FSDP shard of one parameter (dim 0 split over DP, rounded up)."""
    dp = placement.layout.shard_degree
    shapes = placement.block_param_shapes() if rank.layers else []
    if rank.embedding_copies or rank.head:
        shapes.append(placement.embedding_shape)
    return max(-(-a // dp) * b for a, b in shapes)


def _largest_param(placement: Placement) -> int:
    rows, d = placement.embedding_shape
    return max(*(a * b for a, b in placement.block_param_shapes()), rows * d)


def _activations(chunks: int) -> str:
    return f"activations ({chunks} micro-batch chunk{'' if chunks == 1 else 's'} in flight)"


def optimizer_temporaries(placement: Placement, rank: PipelineRank) -> dict[str, float]:
    """What AdamW allocates while it steps, by torch's path: fused (CUDA, megaolmo's default there) nothing;
    foreach (plain tensors on CUDA) sqrt(v) of a whole parameter group; otherwise (CPU, FSDP's DTensors) one
    parameter at a time, sqrt(v) and its scaled copy."""
    work, dp = placement.work, placement.layout.shard_degree
    if work.fused_adam:
        return {}
    rows, d = placement.embedding_shape
    embedding = rank.embedding_copies * -(-rows // dp) * d
    if work.device == "cuda" and not placement.fsdp:
        sharded = placement.sharded_params(rank)
        group = sharded if work.decay_embeddings else max(sharded - embedding, embedding)
        return {"optimizer temporaries (foreach AdamW: a parameter group's sqrt(v))": FP32 * group}
    largest = _largest_shard(placement, rank)
    return {"optimizer temporaries (single-tensor AdamW: sqrt(v) and its scaled copy)": 2 * FP32 * largest}


def plan_memory(placement: Placement) -> list[RankMemory]:
    """Memory of every pipeline rank (ranks of one pipeline stage are alike across TP and DP)."""
    return [_rank_memory(placement, rank) for rank in placement.ranks()]
