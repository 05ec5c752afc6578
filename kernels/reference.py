"""Pure-torch references of the element-wise and row-wise ops around OLMo's GEMMs.

They define the semantics (and the numerics OLMo and Hugging Face use) that any
fused implementation must reproduce: fp32 statistics for the norm, fp32
rotation for RoPE, OLMo's [up | gate] order for SwiGLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim without weight or bias, computed in fp32, returned in x's dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), None, None, eps).to(x.dtype)


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
    cos = cos[:, None, None, :]
    sin = sin[:, None, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [s, b, heads, hd] and k [s, b, kv_heads, hd] by fp32 cos/sin [s, hd // 2] (rotate_half pairing)."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
