"""The OLMo model of every generation: decoder blocks over parallel-aware linears.

It reads like the papers. OLMo-1: `x = x + attn(LN(x)); x = x + mlp(LN(x))` with a
parameter-free LayerNorm. OLMo-2: `x = x + RMSNorm(attn(x)); x = x + RMSNorm(mlp(x))`
with learned weights and QK-norm. OLMo-3: OLMo-2's block with sliding-window
attention on most layers. Module and parameter names follow allenai/OLMo (`wte`,
`blocks.{i}.att_proj`, `attn_out`, `ff_proj`, `ff_out`, `attn_norm`, `ff_norm`,
`q_norm`, `k_norm`, `ln_f`), so conversions are a table, not a puzzle.
Activations inside the stack are [seq, batch, hidden] (Megatron's layout), so
sequence-parallel scatter and gather are contiguous along dim 0.
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
from megaolmo.model.rope import rope_tables, yarn_of
from megaolmo.parallel import ColumnParallelLinear, HeadParallelRMSNorm, RowParallelLinear, VocabParallelEmbedding
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


def _flash_attn_func():
    """flash-attn's kernel, imported only when asked for, so it stays an optional dependency."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise ConfigError(
            "model.attention=flash needs flash-attn: pip install -e '.[flash]', or set model.attention=sdpa"
        ) from None
    return flash_attn_func


@functools.lru_cache(maxsize=8)
def sliding_window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """[s, s] bool, True where query i may attend key j: i - window < j <= i (`window` keys, itself included)."""
    ones = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    return ones.tril().triu(1 - window)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, window: int | None = None
) -> torch.Tensor:
    """Causal attention with scale 1/sqrt(head_dim) on [s, b, heads, hd] tensors; GQA when k/v have fewer heads.

    With `window`, a query sees the `window` most recent keys, itself included (Hugging Face's and
    flash-attn's `window_size=(window - 1, 0)` convention).
    """
    seq_len = q.shape[0]
    if window is not None and window >= seq_len:
        window = None  # the band covers every causal key
    if backend == "flash":
        window_size = (-1, -1) if window is None else (window - 1, 0)
        out = _flash_attn_func()(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal=True, window_size=window_size
        )
        return out.transpose(0, 1)
    q, k, v = (t.permute(1, 2, 0, 3).contiguous() for t in (q, k, v))  # [b, heads, s, hd]
    gqa = k.shape[1] != q.shape[1]
    if window is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        mask = sliding_window_mask(seq_len, window, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.permute(2, 0, 1, 3)


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

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.att_proj(x)  # [s, b, (q + k + v) of this rank's heads]; s is the whole sequence
        s, b, _ = qkv.shape
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split(self.att_proj.local_partition_sizes, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(s, b, -1, self.head_dim) for t in (q, k, v))
        cos, sin = rope_tables(s, self.head_dim, self.rope_theta, q.device, self.yarn)
        q, k = kernels.get(self.kernel_backend, q.device).apply_rope(q, k, cos, sin)
        if self.activation_checkpointing == "selective":
            out = checkpoint(causal_attention, q, k, v, self.attention_backend, self.window, use_reentrant=False)
        else:
            out = causal_attention(q, k, v, self.attention_backend, self.window)
        return self.attn_out(out.reshape(s, b, -1))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff_out(kernels.get(self.kernel_backend, x.device).swiglu(self.ff_proj(x)))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after:  # OLMo-2/3
            x = x + self.attn_norm(self.attention(x))
            return x + self.ff_norm(self.mlp(x))
        x = x + self.attention(self.attn_norm(x))
        return x + self.mlp(self.ff_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, d] -> [s, b, d] (s is this rank's sequence shard under sequence parallelism)."""
        if self.activation_checkpointing == "full":
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class OLMo(nn.Module):
    """OLMo: embedding, `n_layers` blocks, a final norm, and a tied or separate output head.

    A pipeline stage is an OLMo with the parts of other stages removed (`keep_stage`):
    the first stage embeds token ids, the last one (with `ln_f`) returns logits,
    and the others map hidden states to hidden states.
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

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Token ids [batch, seq] (int64) -> logits [batch, seq, padded vocab].

        Inside a pipeline, a stage that does not embed takes and returns hidden states [s, b, d].
        """
        x = self.embed(inputs) if not inputs.is_floating_point() else inputs
        for block in self.blocks.values():
            x = block(x)
        if self.ln_f is None:
            return x
        # Back to [b, s, d] before the head, so the (vocab-wide) logits come out contiguous.
        return self.output_logits(self.ln_f(x).transpose(0, 1))

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
