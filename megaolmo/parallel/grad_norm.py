"""Global gradient-norm clipping over every parallel dimension, each parameter counted once."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float | None, replicas: Iterable[torch.Tensor] = ()
) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before clipping.

    `parameters` must list each parameter exactly once across all ranks (this
    rank's TP shards, FSDP shards and pipeline stages): the squared norms of the
    local shards are summed over the whole world. `replicas` (a tied head's copy
    of the embedding) are scaled alike but not counted. `max_norm=None` only measures.
    """
    parameters = list(parameters)
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    replica_grads = [_local(p.grad) for p in replicas if p.grad is not None]
    # On the parameters' device even where no gradient is: the all-reduce below must run on it (NCCL).
    device = _local(parameters[0]).device if parameters else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for grad in grads:
        total += grad.float().pow(2).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    norm = total.sqrt()
    if max_norm is not None:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grad in grads + replica_grads:
            grad.mul_(scale.to(grad.dtype))
    return norm
