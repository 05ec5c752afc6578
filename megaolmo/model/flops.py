"""What a step costs and what a device gives: model FLOPs per token, peak FLOP/s, peak memory (for MFU)."""

from __future__ import annotations

import resource
import time

import torch

from megaolmo.config import ClusterConfig, ModelConfig


def attended_pairs(seq_len: int, window: int | None = None) -> int:
    """(query, key) pairs causal attention computes over a sequence: query i sees min(window, i + 1) keys."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


def attention_fraction(seq_len: int, window: int | None = None) -> float:
    """A layer's attention work relative to full causal attention at this length: 1 for full layers (and for
    windows as long as the sequence), about 2 window / seq_len for a short window."""
    return attended_pairs(seq_len, window) / attended_pairs(seq_len)


def attention_layers(model: ModelConfig, seq_len: int, blocks: range | None = None) -> float:
    """Blocks' attention in full-layer equivalents: each block weighted by `attention_fraction` of its window."""
    blocks = range(model.n_layers) if blocks is None else blocks
    return sum(attention_fraction(seq_len, model.attention_window(i)) for i in blocks)


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + 12 x d_model x seq_len per layer (attention).

    A full layer's attention term is the usual 12 d s (QK^T and PV over all s keys, forward and backward),
    so OLMo-1 and OLMo-2 count as before. A sliding-window layer (OLMo-3) counts the same term scaled by the
    keys its queries actually see, sum min(window, i + 1), over those of full causal attention: the same
    convention, so MFU compares fairly across the two. OLMo-core instead counts 12 d min(window, s), which
    for a 4096 window at 8192 tokens is 2/3 of this.
    """
    attention = 12 * model.d_model * seq_len * attention_layers(model, seq_len)
    return 6 * model.num_params(include_embedding=False) + attention


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
