"""What a step costs and what a device gives: model FLOPs per token, peak FLOP/s, peak memory (for MFU)."""

from __future__ import annotations

import resource
import time

import torch

from megaolmo.config import ClusterConfig, ModelConfig


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + 12 x layers x d_model x seq_len (attention)."""
    return 6 * model.num_params(include_embedding=False) + 12 * model.n_layers * model.d_model * seq_len


def measured_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Dense matmul FLOP/s this device reaches, for MFU where no datasheet peak is configured."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - start)


def peak_flops_per_device(cluster: ClusterConfig, device: torch.device, dtype: torch.dtype) -> float:
    if cluster.peak_tflops is not None:
        return cluster.peak_tflops * 1e12
    return measured_peak_flops(device, dtype)


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
