"""Tensor-parallel layers: column- and row-parallel linears and a vocab-parallel embedding.

A TP linear is communication around a local GEMM (DESIGN.md, principle 5). Each
layer is built whole (degree 1: exactly its local op, no process group needed)
and `shard(tp)` turns it into this rank's part before any memory is allocated.
A layer knows how its weight is split, so `shard_full` and `gather_full` convert
between the full tensor and this rank's part for initialization, checkpoints
and tests. Fused weights are split by meaning: with `partition_sizes` (q, k, v)
or (up, gate), every rank holds its slice of each block, never all of one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megaolmo import kernels
from megaolmo.parallel.mappings import (
    all_gather,
    copy_to_tp,
    gather_from_sequence,
    reduce_from_tp,
    reduce_scatter_to_sequence,
    sum_over_tp,
)


@dataclass(frozen=True)
class TensorParallel:
    """A TP group and whether activations between TP regions are split along the sequence."""

    group: ProcessGroup
    sequence_parallel: bool = False

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)


def local_linear(in_features: int, out_features: int, device: torch.device | None = None) -> nn.Linear:
    """The local GEMM of a TP linear: a bias-free `nn.Linear` over this rank's shard."""
    return nn.Linear(in_features, out_features, bias=False, device=device)


def _divide(size: int, parts: int, what: str) -> int:
    if size % parts:
        raise ValueError(f"{what} of size {size} is not divisible by tensor-parallel degree {parts}")
    return size // parts


class _RegatherInBackward:
    """Saved-tensor hooks that keep only the sequence shard of an all-gathered linear input.

    A column-parallel linear under sequence parallelism computes on the gathered
    sequence, and autograd would keep that whole tensor for the weight gradient.
    Keeping the shard (which the preceding norm saves anyway) and gathering again
    in backward is Megatron's trade: one more all-gather, tp times less memory.
    """

    def __init__(self, gathered: torch.Tensor, shard: torch.Tensor, group: ProcessGroup, dim: int) -> None:
        self.storage = gathered.untyped_storage().data_ptr()
        self.shard, self.group, self.dim = shard.detach(), group, dim

    def pack(self, tensor: torch.Tensor):
        if tensor.untyped_storage().data_ptr() != self.storage:
            return tensor
        return (self, tensor.size(), tensor.stride(), tensor.storage_offset())

    @staticmethod
    def unpack(packed):
        if not isinstance(packed, tuple):
            return packed
        hooks, size, stride, offset = packed
        gathered = all_gather(hooks.shard, hooks.group, hooks.dim).contiguous()
        return gathered.as_strided(size, stride, offset)


class ColumnParallelLinear(nn.Module):
    """`y = x @ W.T` with W split along its output features: each rank produces a slice of y.

    `sequence_dim` is the dim that sequence parallelism splits in this layer's input.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        partition_sizes: tuple[int, ...] | None = None,
        sequence_dim: int = 0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.partition_sizes = tuple(partition_sizes or (out_features,))
        if sum(self.partition_sizes) != out_features:
            raise ValueError(f"partition sizes {self.partition_sizes} do not add up to {out_features}")
        self.sequence_dim = sequence_dim
        self.tp: TensorParallel | None = None
        self.tp_dim = 0  # the weight dim split across TP ranks
        self.linear = local_linear(in_features, out_features)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def local_partition_sizes(self) -> tuple[int, ...]:
        """Sizes of the fused blocks (e.g. q, k, v) in this rank's output."""
        parts = 1 if self.tp is None else self.tp.size
        return tuple(size // parts for size in self.partition_sizes)

    def shard(self, tp: TensorParallel) -> None:
        for size in self.partition_sizes:
            _divide(size, tp.size, "column-parallel output block")
        self.tp = tp
        self.linear = local_linear(self.in_features, sum(self.local_partition_sizes), self.weight.device)

    def shard_full(self, full: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return full
        blocks = full.split(self.partition_sizes, dim=0)
        return torch.cat([block.chunk(self.tp.size, dim=0)[self.tp.rank] for block in blocks], dim=0)

    def gather_full(self, local: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return local
        per_rank = all_gather(local, self.tp.group, 0).chunk(self.tp.size, dim=0)
        per_rank_blocks = [part.split(self.local_partition_sizes, dim=0) for part in per_rank]
        return torch.cat([torch.cat(blocks, dim=0) for blocks in zip(*per_rank_blocks)], dim=0)

    @property
    def _unit_rows(self) -> tuple[int, ...]:
        """Rows of each fused block in one unit: the blocks' sizes divided by their greatest common divisor."""
        units = math.gcd(*self.partition_sizes)
        return tuple(size // units for size in self.partition_sizes)

    def to_canonical(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows (blocks one after another) in the interleaved order [unit 0 of every block, unit 1,
        ...] in which every valid TP degree's shard is one contiguous range: the layout checkpoints use."""
        units = rows.shape[0] // sum(self._unit_rows)
        blocks = rows.split([units * size for size in self._unit_rows], dim=0)
        interleaved = torch.cat([b.reshape(units, size, *b.shape[1:]) for b, size in zip(blocks, self._unit_rows)], 1)
        return interleaved.reshape(rows.shape)

    def from_canonical(self, rows: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_canonical`."""
        units = rows.shape[0] // sum(self._unit_rows)
        blocks = rows.reshape(units, sum(self._unit_rows), *rows.shape[1:]).split(self._unit_rows, dim=1)
        return torch.cat([block.reshape(-1, *rows.shape[1:]) for block in blocks], dim=0)

    @property
    def vocab_start(self) -> int:
        """The first output feature of this rank's slice (the first vocabulary row, for an output head)."""
        return 0 if self.tp is None else self.tp.rank * self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.linear)

    def forward_with(self, x: torch.Tensor, local: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`local(this rank's input)` in place of the local linear, the input mapped as the layer maps it (copied
        to the TP group, or gathered from the sequence and kept as its shard): a loss that computes the head's
        GEMM chunk by chunk runs inside the layer this way."""
        if self.tp is None:
            return local(x)
        if not self.tp.sequence_parallel:
            return local(copy_to_tp(x, self.tp.group))
        gathered = gather_from_sequence(x, self.tp.group, self.sequence_dim)
        if torch.compiler.is_compiling():  # dynamo traces no saved-tensor hooks: the compiled graph keeps `gathered`
            return local(gathered)
        hooks = _RegatherInBackward(gathered, x, self.tp.group, self.sequence_dim)
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            return local(gathered)


class RowParallelLinear(nn.Module):
    """`y = x @ W.T` with W split along its input features: partial sums of y are reduced across ranks."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.tp: TensorParallel | None = None
        self.tp_dim = 1  # the weight dim split across TP ranks
        self.linear = local_linear(in_features, out_features)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def shard(self, tp: TensorParallel) -> None:
        local_in = _divide(self.in_features, tp.size, "row-parallel input")
        self.tp = tp
        self.linear = local_linear(local_in, self.out_features, self.weight.device)

    def shard_full(self, full: torch.Tensor) -> torch.Tensor:
        return full if self.tp is None else full.chunk(self.tp.size, dim=1)[self.tp.rank]

    def gather_full(self, local: torch.Tensor) -> torch.Tensor:
        return local if self.tp is None else all_gather(local, self.tp.group, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.tp is None:
            return y
        if self.tp.sequence_parallel:
            return reduce_scatter_to_sequence(y, self.tp.group, 0)
        return reduce_from_tp(y, self.tp.group)


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows (the vocabulary) are split across ranks; each rank embeds the ids it owns."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp: TensorParallel | None = None
        self.tp_dim = 0  # the weight dim split across TP ranks
        self.vocab_start = 0
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def shard(self, tp: TensorParallel) -> None:
        rows = _divide(self.num_embeddings, tp.size, "embedding rows (padded vocabulary)")
        self.tp = tp
        self.vocab_start = tp.rank * rows
        self.weight = nn.Parameter(torch.empty(rows, self.embedding_dim, device=self.weight.device))

    def shard_full(self, full: torch.Tensor) -> torch.Tensor:
        return full if self.tp is None else full.chunk(self.tp.size, dim=0)[self.tp.rank]

    def gather_full(self, local: torch.Tensor) -> torch.Tensor:
        return local if self.tp is None else all_gather(local, self.tp.group, 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Ids [seq, batch] -> [seq, batch, hidden] (the sequence split across TP ranks under SP)."""
        if self.tp is None:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        partial = F.embedding(local_ids.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        if self.tp.sequence_parallel:
            return reduce_scatter_to_sequence(partial, self.tp.group, 0)
        return reduce_from_tp(partial, self.tp.group)

    def logits(self, hidden: torch.Tensor, sequence_dim: int) -> torch.Tensor:
        """Logits of this rank's vocabulary slice against the embedding (a head tied to the input embedding)."""
        return self.logits_with(hidden, sequence_dim, lambda h: F.linear(h, self.weight))

    def logits_with(
        self, hidden: torch.Tensor, sequence_dim: int, local: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """`local(this rank's input)` in place of the logits GEMM, the input copied to (or gathered over) the TP
        group as `logits` does."""
        if self.tp is not None:
            if self.tp.sequence_parallel:
                hidden = gather_from_sequence(hidden, self.tp.group, sequence_dim)
            else:
                hidden = copy_to_tp(hidden, self.tp.group)
        return local(hidden)


class HeadParallelRMSNorm(nn.Module):
    """RMSNorm with a weight over features that TP splits by head: OLMo-2's QK-norm of the whole projected q or k.

    The statistic is the mean square over all heads, so under TP each rank sums the squares of its heads and
    the sums meet in an all-reduce (whose gradient is all-reduced too: every rank uses the sum for its own
    heads). Alone, the norm is the fused kernel's.
    """

    def __init__(self, size: int, eps: float, kernel_backend: str) -> None:
        super().__init__()
        self.size = size
        self.eps = eps
        self.kernel_backend = kernel_backend
        self.tp: TensorParallel | None = None
        self.tp_dim = 0  # the weight dim split across TP ranks
        self.weight = nn.Parameter(torch.empty(size))

    def shard(self, tp: TensorParallel) -> None:
        local = _divide(self.size, tp.size, "QK-norm width (heads x head_dim)")
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(local, device=self.weight.device))

    def shard_full(self, full: torch.Tensor) -> torch.Tensor:
        return full if self.tp is None else full.chunk(self.tp.size, dim=0)[self.tp.rank]

    def gather_full(self, local: torch.Tensor) -> torch.Tensor:
        return local if self.tp is None else all_gather(local, self.tp.group, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return kernels.get(self.kernel_backend, x.device).rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        sum_of_squares = sum_over_tp(x32.pow(2).sum(-1, keepdim=True), self.tp.group)
        normalized = (x32 * torch.rsqrt(sum_of_squares / self.size + self.eps)).to(x.dtype)
        return self.weight.to(x.dtype) * normalized  # the reference's order: cast back, then the weight

    def extra_repr(self) -> str:
        return f"{self.size}, eps={self.eps}"


def tensor_parallel_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Parameter name -> the TP layer owning it, for every parameter under `module` that TP splits."""
    owners = {}
    for name, layer in module.named_modules():
        if isinstance(layer, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, HeadParallelRMSNorm)):
            for param_name, _ in layer.named_parameters():
                owners[f"{name}.{param_name}" if name else param_name] = layer
    return owners
