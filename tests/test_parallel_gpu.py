"""The parallel engine on one GPU with NCCL: FSDP2 in bf16 with fp32 master weights (skipped without CUDA)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from megaolmo.config import ModelConfig, ParallelConfig
from megaolmo.model.engine import ParallelOLMo

pytestmark = pytest.mark.gpu

CONFIG = ModelConfig(d_model=256, n_layers=2, n_heads=4, ffn_hidden_size=512, vocab_size=1000, kernels="triton")


def steps(model: ParallelOLMo) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (4, 128), generator=generator)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        losses.append(model.forward_backward(ids, torch.roll(ids, -1, 1), micro_batch_size=2).ce)
        model.clip_grad_norm_(1.0)
        optimizer.step()
    return losses


def test_bf16_fsdp_on_nccl_tracks_fp32() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        bf16 = ParallelOLMo(CONFIG, ParallelConfig(), param_dtype=torch.bfloat16)
        assert all(p.dtype == torch.float32 for p in bf16.parameters())  # master weights
        low = steps(bf16)
        fp32 = steps(ParallelOLMo(CONFIG, ParallelConfig()))
    finally:
        dist.destroy_process_group()
    assert low[-1] < low[0]
    for a, b in zip(low, fp32):
        assert abs(a - b) < 2e-2 * b
