"""The autograd mappings of Megatron-style tensor parallelism, each a collective and its transpose.

    copy_to_tp                  forward: identity        backward: all-reduce
    reduce_from_tp              forward: all-reduce      backward: identity
    gather_from_sequence        forward: all-gather(seq) backward: reduce-scatter(seq)
    reduce_scatter_to_sequence  forward: reduce-scatter  backward: all-gather(seq)
    sum_over_tp                 forward: all-reduce      backward: all-reduce

"seq" is a chosen dim (0 for the [seq, batch, hidden] activations of the stack).
With a group of size 1 every mapping is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

# Renamed in torch 2.13; the old names still exist there, deprecated.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def all_gather(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """Concatenate every rank's x along `dim`.

    Along dim 0 (the stack's sequence) no permutation surrounds the collective, even an identity one: inductor's
    async-TP pass (parallel.async_tp) fuses an all-gather only into the matmul that consumes it directly."""
    world = _size(group)
    moved = x.movedim(dim, 0).contiguous() if dim else x.contiguous()
    out = torch.empty((world * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, moved, group=group)
    return out.movedim(0, dim) if dim else out


def reduce_scatter(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """Sum x over ranks and keep this rank's slice along `dim` (along dim 0 straight from the matmul that
    produced x, as async TP's fusion of a matmul and its reduce-scatter needs)."""
    world = _size(group)
    moved = x.movedim(dim, 0).contiguous() if dim else x.contiguous()
    if moved.shape[0] % world:
        raise ValueError(f"dim {dim} of size {moved.shape[0]} is not divisible by the {world} ranks")
    out = torch.empty((moved.shape[0] // world, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, moved, group=group)
    return out.movedim(0, dim) if dim else out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        # Traced by torch.compile, an input returned as-is trips autograd's view+inplace check on the block's
        # input (an all-reduce's in-place result): the compiled graph copies it instead, eager does not.
        return x.clone() if torch.compiler.is_compiling() else x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumOverTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Enter a TP region: every rank uses all of x; the gradients of the ranks are summed."""
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Leave a TP region: sum the partial results of the ranks."""
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def sum_over_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """A sum over the ranks that each rank goes on to use differently (a statistic over all heads, say):
    unlike `reduce_from_tp`, whose result is used alike everywhere, its gradient is summed too."""
    return x if _size(group) == 1 else _SumOverTP.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group: ProcessGroup | None, dim: int = 0) -> torch.Tensor:
    """Sequence-parallel shards to the whole sequence (before a column-parallel linear)."""
    return x if _size(group) == 1 else _GatherFromSequence.apply(x, group, dim)


def reduce_scatter_to_sequence(x: torch.Tensor, group: ProcessGroup | None, dim: int = 0) -> torch.Tensor:
    """Partial sums over the whole sequence to summed sequence shards (after a row-parallel linear)."""
    return x if _size(group) == 1 else _ReduceScatterToSequence.apply(x, group, dim)
