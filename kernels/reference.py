"""Pure-torch references of the element-wise and row-wise ops around OLMo's GEMMs.

They define the semantics (and the numerics OLMo and Hugging Face use) that any
fused implementation must reproduce: fp32 statistics for the norms, fp32
rotation for RoPE, OLMo's [up | gate] order for SwiGLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim without weight or bias, computed in fp32, returned in x's dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), None, None, eps).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim with a learned weight (OLMo-2 and OLMo-3's norm), returned in x's dtype.

    allenai/OLMo's RMSLayerNorm normalizes in fp32, casts back to x's dtype, and only then multiplies by
    the weight; the weight is cast to x's dtype too, so the result is in x's dtype whatever the weight's
    (an fp32 master weight would otherwise promote a bf16 activation to fp32). In fp32 this is exactly
    transformers' Olmo2RMSNorm, `(weight * x_hat).to(x.dtype)`; in bf16 it rounds x_hat to bf16 before
    the multiply, as OLMo does, where Olmo2RMSNorm multiplies in fp32 and rounds once. float64 stays
    float64 rather than dropping to fp32, so tests can take this as their exact reference.
    """
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    x_hat = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight.to(x.dtype) * x_hat


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for x = [..., 2F] laid out as [up | gate] (OLMo's order, not TE's or Liger's)."""
    up, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin of shape [len(positions), head_dim // 2] for the given token positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = torch.outer(positions.to(torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    # [s, hd / 2]: one row per position, shared by the batch; [s, b, hd / 2]: one row per token.
    cos = cos[:, None, None, :] if cos.dim() == 2 else cos[:, :, None, :]
    sin = sin[:, None, None, :] if sin.dim() == 2 else sin[:, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [s, b, heads, hd] and k [s, b, kv_heads, hd] by fp32 cos/sin [s, hd // 2], or per token
    [s, b, hd // 2] (positions that restart in each document), rotate_half pairing."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
