"""What every Triton kernel wrapper checks before a launch, and the launch settings they share."""

from __future__ import annotations

import os

import torch
import triton

MAX_ROW_WIDTH = 65536  # one row lives in one program's registers


def check_device(*tensors: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors only through its interpreter."""
    for tensor in tensors:
        if tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "kernels=triton got CPU tensors; set TRITON_INTERPRET=1 before importing triton, "
                "or use kernels=torch (or auto)"
            )


def row_settings(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for kernels that hold a whole row of `width` elements in one program."""
    if width > MAX_ROW_WIDTH:
        raise ValueError(f"row width {width} exceeds {MAX_ROW_WIDTH}, the most one Triton program holds")
    block = triton.next_power_of_2(width)
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32
    return block, num_warps


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x viewed as [rows, last dim] with a unit stride along the last dim (a copy only when unavoidable)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()
