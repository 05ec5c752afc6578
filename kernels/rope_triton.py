"""Rotary position embedding of q and k in one launch (rotate_half pairing, fp32 math).

One program rotates every head of q and of k at one (position, batch) pair,
reading cos/sin for that position once. q and k may be strided views (the
split of the fused qkv projection): no copy is made before the kernel. The
backward is the same rotation by -sin.

cos/sin are one [s, hd / 2] table the batch shares, or per-token [s, b, hd / 2]
rows (intra-document attention: positions restart in each document). The
shared table is read through a zero batch stride, so its path loads the very
values it always did.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaolmo.kernels.launch import check_device


@triton.jit
def _rotate_heads(
    X,
    OUT,
    s,
    b,
    stride_s,
    stride_b,
    stride_h,
    out_s,
    out_b,
    out_h,
    n_heads,
    cos,
    sin,
    dims,
    dmask,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    mask = (heads < n_heads)[:, None] & dmask[None, :]
    src = X + s * stride_s + b * stride_b + heads[:, None] * stride_h + dims[None, :]
    dst = OUT + s * out_s + b * out_b + heads[:, None] * out_h + dims[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    Q_OUT,
    K_OUT,
    COS,
    SIN,
    batch,
    n_q_heads,
    n_k_heads,
    q_s,
    q_b,
    q_h,
    k_s,
    k_b,
    k_h,
    qo_s,
    qo_b,
    qo_h,
    ko_s,
    ko_b,
    ko_h,
    cos_s,
    cos_b,
    sin_s,
    sin_b,
    SIGN: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    s = pid // batch
    b = pid % batch
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < HALF
    cos = tl.load(COS + s * cos_s + b * cos_b + dims, mask=dmask, other=0.0).to(tl.float32)
    sin = SIGN * tl.load(SIN + s * sin_s + b * sin_b + dims, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(Q, Q_OUT, s, b, q_s, q_b, q_h, qo_s, qo_b, qo_h, n_q_heads, cos, sin, dims, dmask, HALF, BLOCK_HQ)
    _rotate_heads(K, K_OUT, s, b, k_s, k_b, k_h, ko_s, ko_b, ko_h, n_k_heads, cos, sin, dims, dmask, HALF, BLOCK_HK)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int):
    seq, batch, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[2]
    if k.shape[:2] != (seq, batch) or k.shape[3] != head_dim:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ outside the head count")
    half = head_dim // 2
    if head_dim % 2 or cos.shape not in ((seq, half), (seq, batch, half)) or sin.shape != cos.shape:
        raise ValueError(
            f"apply_rope: cos/sin must be [seq, head_dim // 2] = [{seq}, {half}] or per token "
            f"[seq, batch, head_dim // 2] = [{seq}, {batch}, {half}], got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if cos.dim() == 2:  # the table the batch shares: every (position, batch) program reads its position's row
        cos, sin = cos[:, None].expand(seq, batch, half), sin[:, None].expand(seq, batch, half)
    q, k, cos, sin = (_last_dim_contiguous(t) for t in (q, k, cos, sin))
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if seq * batch:
        block_hq, block_hk = triton.next_power_of_2(n_q_heads), triton.next_power_of_2(n_k_heads)
        num_warps = 4 if max(block_hq, block_hk) * half <= 2048 else 8
        _rope_kernel[(seq * batch,)](
            q, k, q_out, k_out, cos, sin, batch, n_q_heads, n_k_heads,
            *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
            *cos.stride()[:2], *sin.stride()[:2],
            SIGN=sign, HALF=half, BLOCK_D=triton.next_power_of_2(half),
            BLOCK_HQ=block_hq, BLOCK_HK=block_hk, num_warps=num_warps,
        )  # fmt: skip
    return q_out, k_out


@torch.library.custom_op("megaolmo::rope", mutates_args=())
def _rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated by `sign` times the angles (-1: the backward, the inverse rotation)."""
    check_device(q, k, cos, sin)
    return _rotate(q, k, cos, sin, sign=sign)


@_rope.register_fake
def _(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int):
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
    )


def _setup_context(ctx, inputs, output) -> None:
    _, _, cos, sin, sign = inputs
    ctx.save_for_backward(cos, sin)
    ctx.sign = sign


def _backward(ctx, dq: torch.Tensor, dk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
    cos, sin = ctx.saved_tensors
    dq, dk = _rope(dq, dk, cos, sin, -ctx.sign)
    return dq, dk, None, None, None


_rope.register_autograd(_backward, setup_context=_setup_context)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [s, b, heads, hd] and k [s, b, kv_heads, hd] by fp32 cos/sin [s, hd // 2] (or per token,
    [s, b, hd // 2]); one launch for both."""
    return _rope(q, k, cos, sin, 1)
