"""What one device and the network can do, in SI units, from `ClusterConfig`: the planner's stated roofline."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megaolmo.config import ClusterConfig, ConfigError
from megaolmo.model.flops import measured_peak_flops

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """Per-device figures of a cluster: memory in bytes, rates in FLOP/s and bytes/s."""

    name: str
    device_name: str  # what a device is, e.g. H100-SXM
    device: str  # cuda | cpu: decides the kernels, the attention layout and the optimizer path
    devices_per_node: int
    nodes: int
    peak_flops: float  # dense FLOP/s in the compute dtype
    memory_bytes: float  # capacity the planner may fill (capacity minus the reserve)
    capacity_bytes: float
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float
    matmul_efficiency: float
    peak_measured: bool = False  # peak_flops came from a matmul on this machine, not from the config

    @property
    def world_size(self) -> int:
        return self.devices_per_node * self.nodes

    def link_bytes_per_s(self, group_span: int) -> float:
        """Bandwidth of a collective whose ranks lie within `group_span` consecutive global ranks: NVLink when
        they fit in one node, the network otherwise (a ring is as fast as its slowest link)."""
        return self.intra_node_bytes_per_s if group_span <= self.devices_per_node else self.inter_node_bytes_per_s

    @classmethod
    def from_cluster(cls, cluster: ClusterConfig, device: str, bf16: bool) -> Hardware:
        """Fill the roofline from the config; on a CPU-only machine, unset peak and memory are this machine's."""
        missing = [
            f"cluster.{name}"
            for name in ("hbm_gbps", "intra_node_gbps", "inter_node_gbps")
            if getattr(cluster, name) is None
        ]
        if device == "cuda":
            missing += [f"cluster.{name}" for name in ("peak_tflops", "memory_gib") if getattr(cluster, name) is None]
        if missing:
            raise ConfigError(f"cluster {cluster.name!r} does not set {', '.join(missing)}, which the planner needs")
        if not 0 < cluster.matmul_efficiency <= 1:
            raise ConfigError(f"cluster.matmul_efficiency={cluster.matmul_efficiency} must be in (0, 1]")
        if cluster.nodes < 1 or cluster.gpus_per_node < 0:
            raise ConfigError(
                f"cluster.nodes={cluster.nodes} must be at least 1 and cluster.gpus_per_node="
                f"{cluster.gpus_per_node} at least 0"
            )
        measured = cluster.peak_tflops is None
        if measured:
            dtype = torch.bfloat16 if bf16 else torch.float32
            peak = measured_peak_flops(torch.device("cpu"), dtype)
        else:
            peak = cluster.peak_tflops * 1e12
        if cluster.memory_gib is None:
            capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        else:
            capacity = cluster.memory_gib * GIB
        return cls(
            name=cluster.name,
            device_name=cluster.device_name or device,
            device=device,
            devices_per_node=max(cluster.gpus_per_node, 1),
            nodes=cluster.nodes,
            peak_flops=peak,
            memory_bytes=capacity - cluster.memory_reserve_gib * GIB,
            capacity_bytes=capacity,
            hbm_bytes_per_s=cluster.hbm_gbps * 1e9,
            intra_node_bytes_per_s=cluster.intra_node_gbps * 1e9,
            inter_node_bytes_per_s=cluster.inter_node_gbps * 1e9,
            matmul_efficiency=cluster.matmul_efficiency,
            peak_measured=measured,
        )
