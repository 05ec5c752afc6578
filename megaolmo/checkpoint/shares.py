"""Where this rank's share of a tensor lies in the unsharded model: what a checkpoint writes and reads into.

A sharded checkpoint stores each parameter and AdamW moment as the unsharded
model's tensor, exactly the one a single process has (fused q/k/v and up/gate
blocks one after another). A rank holds its tensor-parallel slice of it (for a
fused column-parallel layer, a slice of every block) and, under FSDP, a range of
that slice's rows. That share is at most one rectangle per fused block of the
unsharded tensor. A `Share` lists those rectangles as views of the rank's own
storage, so saving writes straight from the parameters and loading copies
straight into them: no rank gathers, reorders or copies a whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from megaolmo.parallel import ColumnParallelLinear


@dataclass(frozen=True)
class Piece:
    """One rectangle of the unsharded tensor: where it starts, and a view of this rank's storage shaped like it."""

    offsets: tuple[int, ...]
    local: torch.Tensor


@dataclass(frozen=True)
class Share:
    """This rank's part of one unsharded tensor of `shape` (possibly no piece: an empty FSDP shard)."""

    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(piece.local.numel() * piece.local.element_size() for piece in self.pieces)


def whole(tensor: torch.Tensor) -> Share:
    """A tensor every rank holds entirely (the AdamW step count, FP8 scaling state)."""
    return Share(tuple(tensor.shape), (Piece((0,) * tensor.dim(), tensor),))


def _tp_blocks(layer: nn.Module | None, local_length: int) -> list[tuple[int, int, int]]:
    """(start in this rank's slice, length, start in the unsharded tensor) of each block, along the TP dim."""
    tp = getattr(layer, "tp", None)
    if tp is None:
        return [(0, local_length, 0)]
    if isinstance(layer, ColumnParallelLinear):
        blocks, local_start, unsharded_start = [], 0, 0
        for size, local in zip(layer.partition_sizes, layer.local_partition_sizes):
            blocks.append((local_start, local, unsharded_start + tp.rank * local))
            local_start, unsharded_start = local_start + local, unsharded_start + size
        return blocks
    return [(0, local_length, tp.rank * local_length)]


def _dp_offsets(tensor: DTensor) -> tuple[int, ...]:
    """Where the DP shard of an FSDP DTensor starts: FSDP splits a dim like `torch.chunk` (ceil-sized chunks)."""
    offsets = [0] * tensor.dim()
    sharded = set()
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            continue
        if not isinstance(placement, Shard) or placement.dim in sharded:
            raise NotImplementedError(f"checkpointing a DTensor placed {tensor.placements} (FSDP shards one dim)")
        sharded.add(placement.dim)
        extent, parts = tensor.shape[placement.dim], tensor.device_mesh.size(mesh_dim)
        chunk = -(-extent // parts)
        offsets[placement.dim] = min(tensor.device_mesh.get_local_rank(mesh_dim) * chunk, extent)
    local = tensor.to_local().shape
    for dim in sharded:
        if min(offsets[dim] + local[dim], tensor.shape[dim]) - offsets[dim] != local[dim]:
            raise AssertionError(f"DTensor shard of {tuple(local)} at {offsets} disagrees with {tensor.placements}")
    return tuple(offsets)


def share_of(tensor: torch.Tensor, layer: nn.Module | None) -> Share:
    """This rank's share of the unsharded tensor of which `tensor` (a parameter or a moment) is the local part.

    `layer` is the tensor-parallel layer owning it (None for a tensor replicated over TP). An FSDP
    DTensor contributes the rows its DP shard holds; a plain tensor all of its TP slice.
    """
    if isinstance(tensor, DTensor):
        local, starts = tensor.to_local(), _dp_offsets(tensor)
    else:
        local, starts = tensor, (0,) * tensor.dim()
    tp_dim = getattr(layer, "tp_dim", 0)
    shape = list(tensor.shape)  # this rank's TP slice
    blocks = _tp_blocks(layer, shape[tp_dim]) if tensor.dim() else []
    if layer is not None and getattr(layer, "tp", None) is not None:
        shape[tp_dim] *= layer.tp.size
    if not blocks:  # a 0-d tensor
        return Share((), (Piece((), local),))
    first, last = starts[tp_dim], starts[tp_dim] + local.shape[tp_dim]  # the DP shard's range in the TP slice
    pieces = []
    for block_start, length, unsharded_start in blocks:
        lo, hi = max(first, block_start), min(last, block_start + length)
        if hi <= lo or local.numel() == 0:
            continue
        offsets = list(starts)
        offsets[tp_dim] = unsharded_start + lo - block_start
        pieces.append(Piece(tuple(offsets), local.narrow(tp_dim, lo - first, hi - lo)))
    return Share(tuple(shape), tuple(pieces))
