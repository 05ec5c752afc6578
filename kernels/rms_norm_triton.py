"""RMSNorm with a learned weight (OLMo-2 and OLMo-3's norm) in one pass over HBM, forward and backward.

The forward saves its input and an fp32 rstd per row. Unlike the parameter-free
LayerNorm, the output is `w * x_hat`, not x_hat, so saving it would not let the
backward skip a tensor: x_hat would have to come back as `y / w`, which divides
by a learned weight that may be zero and adds the output's rounding to x_hat's.
Saving x_hat instead would cost the forward a second full-size write. The input
costs no extra HBM traffic (it is a view of x unless x's rows are strided along
the last dim), shares storage with x wherever x is kept anyway, and gives back
x_hat = x * rstd bit for bit as the forward computed it.

The backward needs dweight = sum over rows of dy * x_hat, a reduction across
rows. Each program walks a contiguous block of rows, writing dx row by row and
summing its share of dweight in fp32 registers into its own row of a partial
buffer, which torch then sums: no atomics, so dweight is the same bit for bit on
every run on the same device. The per-row gradient, with dx_hat = dy * w, is
dx = rstd * (dx_hat - x_hat * mean(dx_hat * x_hat)).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from megaolmo.kernels.launch import as_rows, check_device, row_settings

# Several programs per SM, so one program's loads overlap another's reductions, while the
# [programs, width] fp32 partial buffer stays a few percent of what the backward moves at
# training shapes. The interpreter runs programs one after another, so a few suffice there;
# fixing their number keeps dweight the same on every CPU.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4


@triton.jit
def _rms_norm_forward(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(Y.dtype.element_ty).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    x_hat = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)  # rounded to x's dtype before the weight, as OLMo
    tl.store(Y + row * stride_y + cols, (w * x_hat).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_backward(
    DY, X, W, RSTD, DX, DW, stride_dy, stride_x, stride_dx, n_rows, N, rows_per_program, BLOCK: tl.constexpr
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(DX.dtype.element_ty).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    first = program.to(tl.int64) * rows_per_program
    for row in range(first, tl.minimum(first + rows_per_program, n_rows)):
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        dw += dy * x_hat.to(DX.dtype.element_ty).to(tl.float32)  # the rounded x_hat the weight multiplied
        dx_hat = dy * w
        dx = rstd * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=0) / N))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + program * N + cols, dw, mask=mask)


@functools.cache
def _backward_programs(device: torch.device) -> int:
    """The most programs the backward launches on `device` (fewer when there are fewer rows)."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


@torch.library.custom_op("megaolmo::rms_norm", mutates_args=())
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): the normalized rows times the weight in x's shape and dtype, and each row's fp32 rstd."""
    check_device(x, weight)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},)")
    rows = as_rows(x)
    weight = weight.contiguous()
    n_rows, width = rows.shape
    block, num_warps = row_settings(width)
    y = torch.empty((n_rows, width), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        _rms_norm_forward[(n_rows,)](
            rows, weight, y, rstd, rows.stride(0), y.stride(0), width, eps, BLOCK=block, num_warps=num_warps
        )
    return y.view(x.shape), rstd


@_rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("megaolmo::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) from the saved input, weight and rstd."""
    rows, weight = as_rows(x), weight.contiguous()
    dy_rows = as_rows(dy)
    n_rows, width = rows.shape
    block, num_warps = row_settings(width)
    rows_per_program = max(triton.cdiv(n_rows, _backward_programs(rows.device)), 1)
    programs = triton.cdiv(n_rows, rows_per_program)
    dx = torch.empty((n_rows, width), dtype=rows.dtype, device=rows.device)
    dw_partial = torch.empty((programs, width), dtype=torch.float32, device=rows.device)
    if programs:
        _rms_norm_backward[(programs,)](
            dy_rows,
            rows,
            weight,
            rstd,
            dx,
            dw_partial,
            dy_rows.stride(0),
            rows.stride(0),
            dx.stride(0),
            n_rows,
            width,
            rows_per_program,
            BLOCK=block,
            num_warps=num_warps,
        )
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


@_rms_norm_backward_op.register_fake
def _(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy: torch.Tensor, _drstd: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, None]:
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _rms_norm_backward_op(dy, x, weight, rstd)
    return dx, dweight, None


_rms_norm.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim times `weight`, fp32 statistics, output in x's dtype (see reference.rms_norm)."""
    return _rms_norm(x, weight, eps)[0]
