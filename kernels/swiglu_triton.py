"""SwiGLU on OLMo's fused ff_proj output in one pass: x = [..., 2F] as [up | gate] -> silu(gate) * up.

The backward keeps only the input and recomputes the sigmoid, so no [..., F]
intermediate (silu(gate), or the product) is stored for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaolmo.kernels.launch import as_rows, check_device

BLOCK = 1024


@triton.jit
def _swiglu_forward(X, Y, stride_x, stride_y, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    up = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(X + row * stride_x + F + cols, mask=mask, other=0.0).to(tl.float32)
    y = up * gate * tl.sigmoid(gate)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(DY, X, DX, stride_dy, stride_x, stride_dx, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(X + row * stride_x + F + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    d_up = dy * silu
    d_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DX + row * stride_dx + cols, d_up.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * stride_dx + F + cols, d_gate.to(DX.dtype.element_ty), mask=mask)


def _grid(n_rows: int, width: int) -> tuple[int, int]:
    return (n_rows, triton.cdiv(width, BLOCK))


@torch.library.custom_op("megaolmo::swiglu", mutates_args=())
def _swiglu(x: torch.Tensor) -> torch.Tensor:
    check_device(x)
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim ([up | gate]), got {x.shape[-1]}")
    rows = as_rows(x)
    n_rows, width = rows.shape[0], rows.shape[1] // 2
    y = torch.empty((n_rows, width), dtype=x.dtype, device=x.device)
    if y.numel():
        _swiglu_forward[_grid(n_rows, width)](rows, y, rows.stride(0), y.stride(0), width, BLOCK=BLOCK)
    return y.view(*x.shape[:-1], width)


@_swiglu.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)


@torch.library.custom_op("megaolmo::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    rows, dy_rows = as_rows(x), as_rows(dy)
    n_rows, width = rows.shape[0], rows.shape[1] // 2
    dx = torch.empty((n_rows, 2 * width), dtype=rows.dtype, device=rows.device)
    if dx.numel():
        _swiglu_backward[_grid(n_rows, width)](
            dy_rows, rows, dx, dy_rows.stride(0), rows.stride(0), dx.stride(0), width, BLOCK=BLOCK
        )
    return dx.view(x.shape)


@_swiglu_backward_op.register_fake
def _(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    return _swiglu_backward_op(dy, x)


_swiglu.register_autograd(_backward, setup_context=_setup_context)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for x = [..., 2F] laid out as [up | gate] (OLMo's order)."""
    return _swiglu(x)
