"""The model on a GPU: bf16 autocast and flash-attn against SDPA (skipped without CUDA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megaolmo import ModelConfig, build_model

pytestmark = pytest.mark.gpu

CONFIG = ModelConfig(d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=512, vocab_size=1000)


def test_bf16_autocast_logits_track_fp32() -> None:
    torch.manual_seed(0)
    model = build_model(CONFIG, device="cuda").eval()
    input_ids = torch.randint(0, 1000, (2, 128), device="cuda")
    with torch.no_grad():
        reference = model(input_ids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(input_ids)
    assert ((low.float() - reference).abs().max() / reference.abs().max()).item() < 3e-2


def test_flash_attention_matches_sdpa() -> None:
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    sdpa = build_model(CONFIG, device="cuda").to(torch.bfloat16).eval()
    flash = build_model(dataclasses.replace(CONFIG, attention="flash"), device="cuda").to(torch.bfloat16)
    flash.load_state_dict(sdpa.state_dict())
    flash.eval()
    input_ids = torch.randint(0, 1000, (2, 128), device="cuda")
    with torch.no_grad():
        expected, got = sdpa(input_ids).float(), flash(input_ids).float()
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 2e-2
