"""Data parallelism with FSDP2: each block sharded over the DP sub-mesh, fp32 master weights.

Gradients are summed, not averaged, across DP ranks: the loss is already
divided by the tokens of the whole global batch, which keeps the result equal
to one process seeing that batch whatever the layout.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def shard_data_parallel(
    root: nn.Module,
    children: list[nn.Module],
    dp_mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> FSDPModule:
    """`fully_shard` each child (a block), then the root for what remains (embedding, head).

    Parameters stay in fp32 (the master copy, sharded); forward and backward
    run in `param_dtype`; gradients are reduced in `reduce_dtype`.
    `reshard_after_forward=False` keeps gathered parameters until backward (ZeRO-2).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for child in children:
        fully_shard(child, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    return root
