"""The OLMo-1 model: pre-norm decoder blocks over parallel-aware linears.

It reads like the paper: `x = x + attn(LN(x)); x = x + mlp(LN(x))`. Module and
parameter names follow allenai/OLMo (`wte`, `blocks.{i}.att_proj`, `attn_out`,
`ff_proj`, `ff_out`, `ln_f`), so conversions are a table, not a puzzle.
Activations inside the stack are [seq, batch, hidden] (Megatron's layout), so
sequence-parallel scatter and gather are contiguous along dim 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megaolmo import kernels
from megaolmo.config import ConfigError, ModelConfig
from megaolmo.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_logits,
)


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


def _flash_attn_func():
    """flash-attn's kernel, imported only when asked for, so it stays an optional dependency."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise ConfigError(
            "model.attention=flash needs flash-attn: pip install -e '.[flash]', or set model.attention=sdpa"
        ) from None
    return flash_attn_func


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal attention with scale 1/sqrt(head_dim) on [s, b, heads, hd] tensors; GQA when k/v have fewer heads."""
    if backend == "flash":
        out = _flash_attn_func()(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal=True)
        return out.transpose(0, 1)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, hd]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    return out.permute(2, 0, 1, 3)


class OLMoBlock(nn.Module):
    """One pre-norm block: fused-QKV attention with RoPE, then a SwiGLU MLP, each added to the residual."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.kernel_backend = config.kernels
        self.attention_backend = config.attention
        self.clip_qkv = config.clip_qkv
        self.head_dim = config.head_dim
        hd = config.head_dim
        self.qkv_sizes = (config.n_heads * hd, config.kv_heads * hd, config.kv_heads * hd)
        self.attn_norm = LayerNorm(config.layer_norm_eps, config.kernels)
        self.att_proj = ColumnParallelLinear(config.d_model, sum(self.qkv_sizes))
        self.attn_out = RowParallelLinear(config.n_heads * hd, config.d_model)
        self.ff_norm = LayerNorm(config.layer_norm_eps, config.kernels)
        self.ff_proj = ColumnParallelLinear(config.d_model, 2 * config.ffn_hidden_size)
        self.ff_out = RowParallelLinear(config.ffn_hidden_size, config.d_model)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s, b, _ = x.shape
        qkv = self.att_proj(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = (t.view(s, b, -1, self.head_dim) for t in qkv.split(self.qkv_sizes, dim=-1))
        q, k = kernels.get(self.kernel_backend, q.device).apply_rope(q, k, cos, sin)
        out = causal_attention(q, k, v, self.attention_backend)
        return self.attn_out(out.reshape(s, b, -1))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff_out(kernels.get(self.kernel_backend, x.device).swiglu(self.ff_proj(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.ff_norm(x))


class OLMo(nn.Module):
    """OLMo-1: embedding, `n_layers` blocks, final LayerNorm, and a tied or separate output head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.kernels == "triton" and not kernels.triton_available():
            raise ConfigError("model.kernels=triton needs Triton: pip install triton, or set model.kernels=torch")
        self.wte = VocabParallelEmbedding(config.padded_vocab_size, config.d_model)
        self.blocks = nn.ModuleList(OLMoBlock(config, i) for i in range(config.n_layers))
        self.ln_f = LayerNorm(config.layer_norm_eps, config.kernels)
        self.head = None if config.weight_tying else ColumnParallelLinear(config.d_model, config.padded_vocab_size)

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin for positions 0..seq_len-1, computed once per forward and shared by every block."""
        positions = torch.arange(seq_len, device=device)
        return kernels.rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)

    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the padded vocabulary from the final hidden states."""
        if self.head is None:
            return vocab_parallel_logits(x, self.wte.weight)
        return self.head(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [batch, seq] (int64) -> logits [batch, seq, padded vocab]."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_sequence_length:
            raise ValueError(
                f"sequence length {seq_len} exceeds model.max_sequence_length={self.config.max_sequence_length}"
            )
        x = self.wte(input_ids.t())  # [s, b, d]
        cos, sin = self.rope(seq_len, x.device)
        for block in self.blocks:
            x = block(x, cos, sin)
        # Back to [b, s, d] before the head, so the (vocab-wide) logits come out contiguous.
        return self.output_logits(self.ln_f(x).transpose(0, 1))

    @torch.no_grad()
    def init_weights(self) -> None:
        """OLMo's "mitchell" init: truncated normals at +-3 std, output projections scaled by depth."""
        d_model = self.config.d_model
        ffn = self.config.ffn_hidden_size
        _trunc_normal(self.wte.weight, d_model**-0.5)
        for i, block in enumerate(self.blocks):
            _trunc_normal(block.att_proj.weight, d_model**-0.5)
            _trunc_normal(block.ff_proj.weight, d_model**-0.5)
            _trunc_normal(block.attn_out.weight, 1 / math.sqrt(2 * d_model * (i + 1)))
            _trunc_normal(block.ff_out.weight, 1 / math.sqrt(2 * ffn * (i + 1)))
        if self.head is not None:
            _trunc_normal(self.head.weight, d_model**-0.5)


def _trunc_normal(weight: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


def build_model(config: ModelConfig, device: str | torch.device = "cpu", init: bool = True) -> OLMo:
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
            model.init_weights()
    return model
