"""Parameter-free LayerNorm in one pass over HBM, forward and backward.

The forward saves its output and an fp32 rstd per row instead of its input:
the next linear saves that same output tensor for its weight gradient, so the
norm adds only 4 bytes per row to the activations kept for backward. The
backward recovers x_hat from the output, and needs no cross-row reduction since
there is no weight:  dx = rstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaolmo.kernels.launch import as_rows, check_device, row_settings


@triton.jit
def _layer_norm_forward(X, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
    tl.store(Y + row * stride_y + cols, (centered * rstd).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_backward(DY, Y, RSTD, DX, stride_dy, stride_y, stride_dx, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    x_hat = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    mean_dy = tl.sum(dy, axis=0) / N
    mean_dy_xhat = tl.sum(dy * x_hat, axis=0) / N
    dx = rstd * (dy - mean_dy - x_hat * mean_dy_xhat)
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


@torch.library.custom_op("megaolmo::layer_norm", mutates_args=())
def _layer_norm(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): the normalized rows in x's shape and dtype, and each row's fp32 rstd."""
    check_device(x)
    rows = as_rows(x)
    n_rows, width = rows.shape
    block, num_warps = row_settings(width)
    y = torch.empty((n_rows, width), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        _layer_norm_forward[(n_rows,)](
            rows, y, rstd, rows.stride(0), y.stride(0), width, eps, BLOCK=block, num_warps=num_warps
        )
    return y.view(x.shape), rstd


@_layer_norm.register_fake
def _(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("megaolmo::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    y_rows = y.view(-1, y.shape[-1])
    dy_rows = as_rows(dy)
    n_rows, width = y_rows.shape
    block, num_warps = row_settings(width)
    dx = torch.empty_like(y_rows)
    if n_rows:
        _layer_norm_backward[(n_rows,)](
            dy_rows,
            y_rows,
            rstd,
            dx,
            dy_rows.stride(0),
            y_rows.stride(0),
            dx.stride(0),
            width,
            BLOCK=block,
            num_warps=num_warps,
        )
    return dx.view(y.shape)


@_layer_norm_backward_op.register_fake
def _(dy: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output)


def _backward(ctx, dy: torch.Tensor, _drstd: torch.Tensor | None) -> tuple[torch.Tensor, None]:
    y, rstd = ctx.saved_tensors
    return _layer_norm_backward_op(dy, y, rstd), None


_layer_norm.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim, no weight or bias, fp32 statistics, output in x's dtype."""
    return _layer_norm(x, eps)[0]
