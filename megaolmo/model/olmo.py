"""The OLMo model of every generation: decoder blocks over parallel-aware linears.

It reads like the papers. OLMo-1: `x = x + attn(LN(x)); x = x + mlp(LN(x))` with a
parameter-free LayerNorm. OLMo-2: `x = x + RMSNorm(attn(x)); x = x + RMSNorm(mlp(x))`
with learned weights and QK-norm. OLMo-3: OLMo-2's block with sliding-window
attention on most layers. Module and parameter names follow allenai/OLMo (`wte`,
`blocks.{i}.att_proj`, `attn_out`, `ff_proj`, `ff_out`, `attn_norm`, `ff_norm`,
`q_norm`, `k_norm`, `ln_f`), so conversions are a table, not a puzzle.
Activations inside the stack are [seq, batch, hidden] (Megatron's layout), so
sequence-parallel scatter and gather are contiguous along dim 0. Given each token's
position in its document (`doc_positions`), attention stays within documents and
RoPE restarts in each (`Documents`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup
from torch.utils.checkpoint import checkpoint

from megaolmo import kernels
from megaolmo.config import ConfigError, ModelConfig
from megaolmo.model.init import init_parameters
from megaolmo.model.loss import TokenLosses
from megaolmo.model.rope import rope_tables, yarn_of
from megaolmo.parallel import ColumnParallelLinear, HeadParallelRMSNorm, RowParallelLinear, VocabParallelEmbedding
from megaolmo.parallel.context import ContextParallel, SequenceShard, ring_attention, rope_rows
from megaolmo.parallel.mappings import copy_to_tp


class LayerNorm(nn.Module):
    """OLMo's parameter-free LayerNorm (fp32 statistics, output in the input's dtype)."""

    def __init__(self, eps: float, kernel_backend: str) -> None:
        super().__init__()
        self.eps = eps
        self.kernel_backend = kernel_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.get(self.kernel_backend, x.device).layer_norm(x, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, kernels={self.kernel_backend}"


class RMSNorm(nn.Module):
    """OLMo-2's RMSNorm with a learned weight (fp32 statistics, cast back, then the weight).

    Its weight is replicated over TP. Under sequence parallelism each TP rank normalizes another part of
    the sequence, so the weight enters through `copy_to_tp`: the ranks' gradients are summed (Megatron's
    all-reduce of sequence-parallel norm weights), where without SP they are equal already.
    """

    def __init__(self, size: int, eps: float, kernel_backend: str) -> None:
        super().__init__()
        self.eps = eps
        self.kernel_backend = kernel_backend
        self.sequence_parallel_group: ProcessGroup | None = None  # set by parallelize under SP
        self.weight = nn.Parameter(torch.empty(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_tp(self.weight, self.sequence_parallel_group)
        return kernels.get(self.kernel_backend, x.device).rms_norm(x, weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, kernels={self.kernel_backend}"


def _norm(config: ModelConfig, size: int) -> LayerNorm | RMSNorm:
    """The generation's norm: OLMo-1's parameter-free LayerNorm, or OLMo-2/3's RMSNorm with a weight."""
    if config.arch == "olmo1":
        return LayerNorm(config.layer_norm_eps, config.kernels)
    return RMSNorm(size, config.layer_norm_eps, config.kernels)


def _flash_attn(name: str):
    """flash-attn's kernel `name`, imported only when asked for, so it stays an optional dependency."""
    try:
        import flash_attn
    except ImportError:
        raise ConfigError(
            "model.attention=flash needs flash-attn: pip install -e '.[flash]', or set model.attention=sdpa"
        ) from None
    return getattr(flash_attn, name)


@functools.lru_cache(maxsize=8)
def sliding_window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """[s, s] bool, True where query i may attend key j: i - window < j <= i (`window` keys, itself included)."""
    ones = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    return ones.tril().triu(1 - window)


class Documents:
    """The documents of a micro-batch, in the forms attention and RoPE take them (built once per stage forward).

    From `doc_positions` [b, s], each token's position in its document (megaolmo.data.documents): RoPE
    rotates by those positions, SDPA takes a [b, 1, s, s] mask of (same document, causal, in the window),
    and flash-attn's variable-length kernel takes the documents' boundaries in the flattened [b * s] tokens.
    Each form is computed on first use and kept: blocks with the same window share one mask. Inside a
    compiled block (`model.compile`) the rows and masks are recomputed instead, in the block's own graph:
    a cache written by one graph and read by the next would make each block's graph depend on which ran
    before it, and the compiler fuses the gather and the comparison into the block anyway.
    """

    def __init__(self, doc_positions: torch.Tensor) -> None:
        self.positions = doc_positions
        self.seq_len = doc_positions.shape[1]
        self._masks: dict[int | None, torch.Tensor] = {}
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._varlen: tuple[torch.Tensor, int] | None = None

    def rope(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token [s, b, hd / 2] rows of the [s, hd / 2] tables: each document rotated from position 0.

        Gathered once per table (blocks share the cached tables of rope_tables; YaRN's are another)."""
        positions = self.positions.t()
        if torch.compiler.is_compiling():
            return cos[positions], sin[positions]
        return rope_rows(self._rows, positions, cos, sin)

    def mask(self, window: int | None) -> torch.Tensor:
        """[b, 1, s, s] bool, True where query i may attend key j: j <= i in the same document, and within
        `window` keys when there is one."""
        if torch.compiler.is_compiling():
            return self._mask(window)
        if window not in self._masks:
            self._masks[window] = self._mask(window)
        return self._masks[window]

    def _mask(self, window: int | None) -> torch.Tensor:
        seq_len = self.positions.shape[1]
        document = (self.positions == 0).cumsum(dim=1)  # which document of its row each token is in
        same = document[:, :, None] == document[:, None, :]
        return (same & sliding_window_mask(seq_len, window or seq_len, same.device))[:, None]

    def varlen(self) -> tuple[torch.Tensor, int]:
        """flash-attn's `cu_seqlens` (int32: where each document starts in the flattened [b * s] tokens, then
        b * s) and `max_seqlen` (the row length, a bound on every document that needs no read of the device).
        A row's end is always a document's end. Finding the starts waits for the device once per stage forward
        of a micro-batch, not once per block."""
        if self._varlen is None:
            flat = self.positions.flatten()
            starts = (flat == 0).nonzero().flatten()
            cu_seqlens = torch.cat([starts, starts.new_full((1,), flat.numel())]).to(torch.int32)
            self._varlen = cu_seqlens, self.positions.shape[-1]
        return self._varlen


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str,
    window: int | None = None,
    documents: Documents | SequenceShard | None = None,
) -> torch.Tensor:
    """Causal attention with scale 1/sqrt(head_dim) on [s, b, heads, hd] tensors; GQA when k/v have fewer heads.

    With `window`, a query sees the `window` most recent keys, itself included (Hugging Face's and
    flash-attn's `window_size=(window - 1, 0)` convention). With `documents`, only keys of its own document
    (and the window within it): flash-attn's variable-length kernel on the flattened tokens, or SDPA with
    the equivalent mask. Under context parallelism `documents` is this rank's `SequenceShard` (its tokens of
    the sequence, and the documents when masked), and the attention a ring over the CP group.
    """
    seq_len, batch = q.shape[:2]
    if window is not None and window >= (seq_len if documents is None else documents.seq_len):
        window = None  # the band covers every causal key
    if isinstance(documents, SequenceShard):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        return ring_attention(q, k, v, documents, window).permute(2, 0, 1, 3)
    if backend == "flash":
        window_size = (-1, -1) if window is None else (window - 1, 0)
        if documents is None:
            out = _flash_attn("flash_attn_func")(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal=True, window_size=window_size
            )
            return out.transpose(0, 1)
        cu_seqlens, max_seqlen = documents.varlen()
        q, k, v = (t.transpose(0, 1).reshape(batch * seq_len, *t.shape[2:]) for t in (q, k, v))
        out = _flash_attn("flash_attn_varlen_func")(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True, window_size=window_size
        )
        return out.view(batch, seq_len, *out.shape[1:]).transpose(0, 1)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, hd] views: SDPA reads strided inputs
    mask = None
    if documents is not None or window is not None:
        mask = documents.mask(window) if documents is not None else sliding_window_mask(seq_len, window, q.device)
    gqa = k.shape[1] != q.shape[1]
    native_gqa = gqa and sdpa_takes_gqa(q.device.type, q.dtype, masked=mask is not None)
    if gqa and not native_gqa:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=native_gqa)
    return out.permute(2, 0, 1, 3)  # CPU's kernel writes the query's [s, b, heads, hd] order: no copy follows


def sdpa_takes_gqa(device_type: str, dtype: torch.dtype, *, masked: bool) -> bool:
    """Whether SDPA attends fewer k/v heads than query heads (`enable_gqa`) with a fused kernel here.

    CPU's flash kernel does, in any dtype and with a mask. On CUDA only the flash kernel does (fp16/bf16,
    no mask): elsewhere `enable_gqa` falls back to the math kernel, which materializes [b, h, s, s] scores,
    so there k and v are expanded to every query head instead and the memory-efficient kernel runs.
    """
    if device_type == "cpu":
        return True
    return not masked and dtype in (torch.float16, torch.bfloat16)


class OLMoBlock(nn.Module):
    """One block: fused-QKV attention with RoPE, then a SwiGLU MLP, each added to the residual.

    OLMo-1 normalizes each sublayer's input; OLMo-2/3 normalize its output and RMS-normalize q and k.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.kernel_backend = config.kernels
        self.attention_backend = config.attention
        self.clip_qkv = config.clip_qkv
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.yarn = yarn_of(config) if config.rope_scaled(layer_idx) else None
        self.window = config.attention_window(layer_idx)
        self.norm_after = config.norm_after
        self.activation_checkpointing = "none"  # none | full | selective, set by parallelize
        hd = config.head_dim
        qkv_sizes = (config.n_heads * hd, config.kv_heads * hd, config.kv_heads * hd)
        self.attn_norm = _norm(config, config.d_model)
        self.att_proj = ColumnParallelLinear(config.d_model, sum(qkv_sizes), partition_sizes=qkv_sizes)
        self.q_norm: HeadParallelRMSNorm | None = None
        self.k_norm: HeadParallelRMSNorm | None = None
        if config.qk_norm:
            self.q_norm = HeadParallelRMSNorm(qkv_sizes[0], config.layer_norm_eps, config.kernels)
            self.k_norm = HeadParallelRMSNorm(qkv_sizes[1], config.layer_norm_eps, config.kernels)
        self.attn_out = RowParallelLinear(config.n_heads * hd, config.d_model)
        self.ff_norm = _norm(config, config.d_model)
        ffn = config.ffn_hidden_size
        self.ff_proj = ColumnParallelLinear(config.d_model, 2 * ffn, partition_sizes=(ffn, ffn))
        self.ff_out = RowParallelLinear(ffn, config.d_model)

    def attention(self, x: torch.Tensor, documents: Documents | SequenceShard | None) -> torch.Tensor:
        qkv = self.att_proj(x)  # [s, b, (q + k + v) of this rank's heads]; s: the sequence, or this CP rank's share
        s, b, _ = qkv.shape
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split(self.att_proj.local_partition_sizes, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(s, b, -1, self.head_dim) for t in (q, k, v))
        table_len = s if documents is None else documents.seq_len
        cos, sin = rope_tables(table_len, self.head_dim, self.rope_theta, q.device, self.yarn)
        if documents is not None:
            cos, sin = documents.rope(cos, sin)
        q, k = kernels.get(self.kernel_backend, q.device).apply_rope(q, k, cos, sin)
        # v in its own storage: the attention keeps v for backward, and as a view it would keep att_proj's whole
        # output (q + 2 kv wide) alive; q and k are RoPE's outputs already.
        v = v.contiguous()
        if self.activation_checkpointing == "selective":
            out = checkpoint(
                causal_attention, q, k, v, self.attention_backend, self.window, documents, use_reentrant=False
            )
        else:
            out = causal_attention(q, k, v, self.attention_backend, self.window, documents)
        return self.attn_out(out.reshape(s, b, -1))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff_out(kernels.get(self.kernel_backend, x.device).swiglu(self.ff_proj(x)))

    def _forward(self, x: torch.Tensor, documents: Documents | SequenceShard | None) -> torch.Tensor:
        if self.norm_after:  # OLMo-2/3
            x = x + self.attn_norm(self.attention(x, documents))
            return x + self.ff_norm(self.mlp(x))
        x = x + self.attention(self.attn_norm(x), documents)
        return x + self.mlp(self.ff_norm(x))

    def forward(self, x: torch.Tensor, documents: Documents | SequenceShard | None = None) -> torch.Tensor:
        """[s, b, d] -> [s, b, d] (s is this rank's sequence shard under sequence and context parallelism); with
        `documents`, attention within each document (under CP, this rank's `SequenceShard`).

        `documents` is an argument of the checkpointed function, not state of the block, so a recompute in
        backward sees the micro-batch's own documents whatever has run since.
        """
        if self.activation_checkpointing == "full":
            return checkpoint(self._forward, x, documents, use_reentrant=False)
        return self._forward(x, documents)


class OLMo(nn.Module):
    """OLMo: embedding, `n_layers` blocks, a final norm, and a tied or separate output head.

    A pipeline stage is an OLMo with the parts of other stages removed (`keep_stage`):
    the first stage embeds token ids, the last one (with `ln_f`) returns logits,
    and the others map hidden states to hidden states. Under context parallelism
    (`context_parallel`, set by parallelize) a stage holds this CP rank's tokens of each
    sequence (megaolmo.parallel.context) and its attention is a ring over the CP group.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.kernels == "triton" and not kernels.triton_available():
            raise ConfigError("model.kernels=triton needs Triton: pip install triton, or set model.kernels=torch")
        self.wte: VocabParallelEmbedding | None = VocabParallelEmbedding(config.padded_vocab_size, config.d_model)
        self.blocks = nn.ModuleDict({str(i): OLMoBlock(config, i) for i in range(config.n_layers)})
        self.ln_f: LayerNorm | RMSNorm | None = _norm(config, config.d_model)
        self.head: ColumnParallelLinear | None = None
        if not config.weight_tying:
            self.head = ColumnParallelLinear(config.d_model, config.padded_vocab_size, sequence_dim=1)
        self.token_losses = TokenLosses()  # what a forward with labels computes (the engine sets its options)
        self.context_parallel: ContextParallel | None = None

    def keep_stage(self, blocks: range, first: bool, last: bool) -> None:
        """Drop everything a pipeline stage holding `blocks` does not run (a tied last stage keeps wte)."""
        for name in list(self.blocks):
            if int(name) not in blocks:
                del self.blocks[name]
        if not first and not (last and self.config.weight_tying):
            self.wte = None
        if not last:
            self.ln_f = self.head = None

    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over (this rank's slice of) the padded vocabulary from [b, s, d] final hidden states."""
        if self.head is None:
            return self.wte.logits(x, sequence_dim=1)
        return self.head(x)

    def forward(
        self, inputs: torch.Tensor, doc_positions: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids [batch, seq] (int64) -> logits [batch, seq, padded vocab]; with `labels` [batch, seq], the
        per-token losses [batch, seq, 2] instead (`token_losses`: cross entropy and log-sum-exp), which need
        not form the whole logits.

        Inside a pipeline, a stage that does not embed takes and returns hidden states [s, b, d], and one that
        does not end the model ignores `labels`. `doc_positions` [batch, seq]
        (megaolmo.data.documents.document_positions: each token's position in its document) switches on
        intra-document attention: a token attends only to its own document, and RoPE counts positions from
        each document's start. Under context parallelism `inputs`, `labels` and the hidden states hold this CP
        rank's tokens of each sequence (megaolmo.parallel.context.zigzag_split), and `doc_positions` the whole
        sequence's.
        """
        embeds = not inputs.is_floating_point()
        x = self.embed(inputs) if embeds else inputs
        if self.context_parallel is not None:
            cp = self.context_parallel
            local_len = inputs.shape[1] if embeds else inputs.shape[0] * cp.sequence_split
            documents = SequenceShard(cp, local_len, x.device, doc_positions)
        else:
            documents = None if doc_positions is None else Documents(doc_positions)
        for block in self.blocks.values():
            x = block(x, documents)
        if self.ln_f is None:
            return x
        # Back to [b, s, d] before the head, so the (vocab-wide) logits come out contiguous.
        hidden = self.ln_f(x).transpose(0, 1)
        if labels is not None:
            return self.token_losses(self.head if self.head is not None else self.wte, hidden, labels)
        return self.output_logits(hidden)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_sequence_length:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds "
                f"model.max_sequence_length={self.config.max_sequence_length}"
            )
        return self.wte(input_ids.t())  # [s, b, d]

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """OLMo's init ("mitchell" or "normal"), the same values for the same seed whatever the parallel layout."""
        init_parameters(self, self.config, seed)


def build_model(config: ModelConfig, device: str | torch.device = "cpu", init: bool = True, seed: int = 0) -> OLMo:
    """Construct without allocating (meta device), then materialize on `device` and initialize once.

    On `device="meta"` nothing is allocated, which is how the 65B/70B shapes are
    inspected on a laptop.
    """
    with torch.device("meta"):
        model = OLMo(config)
    device = torch.device(device)
    if device.type != "meta":
        model.to_empty(device=device)
        if init:
            model.init_weights(seed)
    return model
