"""The one mesh authority: degrees, rank order, the DeviceMesh and every process group.

Ranks follow Megatron's order, TP fastest, then CP, then DP, then PP, so a TP group
sits inside a node and a CP ring next to it:
rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank. FSDP shards the
weights over DP and CP together (the flattened "dp_cp" sub-mesh, as Megatron and
torchtitan do): CP ranks compute gradients of the same weights from different
tokens. Nothing else in megaolmo creates process groups.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megaolmo.config import ParallelConfig, resolve_dp
from megaolmo.errors import ConfigError


def device_type(parallel: ParallelConfig) -> str:
    """cuda with NCCL when a GPU is there (or asked for), cpu with gloo otherwise."""
    if parallel.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if parallel.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("parallel.device=cuda but no CUDA GPU is visible; use parallel.device=cpu or auto")
    return parallel.device


class ParallelMesh:
    """Degrees, this rank's coordinates, the DeviceMesh ("pp", "dp", "cp", "tp") and its groups.

    Without an initialized process group (one process, all degrees 1) there are
    no groups: every `*_group` is None and the parallel layers stay local.
    """

    def __init__(self, parallel: ParallelConfig) -> None:
        self.config = parallel
        self.device_type = device_type(parallel)
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        self.tp, self.pp, self.vp, self.cp = parallel.tp, parallel.pp, parallel.vp, parallel.cp
        self.dp = resolve_dp(parallel, world_size)
        self.device_mesh: DeviceMesh | None = None
        # FSDP's sub-mesh, which it shards the weights and sums the gradients over: DP, with CP flattened in.
        self.shard_mesh: DeviceMesh | None = None
        self.tp_group = self.dp_group = self.pp_group = self.cp_group = None
        self.embedding_group: ProcessGroup | None = None
        self.tp_rank = self.dp_rank = self.pp_rank = self.cp_rank = 0
        if self.device_type == "cuda" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per rank, as torchrun numbers them
        if distributed:
            self.device_mesh = init_device_mesh(
                self.device_type, (self.pp, self.dp, self.cp, self.tp), mesh_dim_names=("pp", "dp", "cp", "tp")
            )
            for name in ("tp", "dp", "cp", "pp"):
                setattr(self, f"{name}_group", self.device_mesh.get_group(name))
                setattr(self, f"{name}_rank", self.device_mesh.get_local_rank(name))
            self.shard_mesh = self.device_mesh["dp"] if self.cp == 1 else self.device_mesh["dp", "cp"]._flatten("dp_cp")

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def build_amax_group(self) -> ProcessGroup | None:
        """The TP x CP x DP ranks of this rank's pipeline stage (FP8 amax reduction, as in Megatron).
        Every rank must call this, in step."""
        if self.device_mesh is None:
            return None
        mine = None
        for stage_ranks in self.device_mesh.mesh:  # [dp, cp, tp] per pipeline rank
            ranks = [int(r) for r in stage_ranks.flatten()]
            group = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                mine = group
        return mine

    def build_embedding_group(self) -> ProcessGroup | None:
        """Pairs (first stage, last stage) at equal (dp, cp, tp) coordinates, for summing the gradients of a
        weight both ends of the pipeline hold (a tied embedding). Every rank must call this, in step."""
        if self.device_mesh is None or self.pp == 1:
            return None
        ranks = self.device_mesh.mesh.flatten(1)  # [pp, dp x cp x tp] -> global rank
        for column in range(ranks.shape[1]):
            pair = [int(ranks[0, column]), int(ranks[-1, column])]
            group = dist.new_group(pair)
            if dist.get_rank() in pair:
                self.embedding_group = group
        return self.embedding_group
