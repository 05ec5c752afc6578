"""The model on a GPU: bf16 autocast, flash-attn against SDPA, OLMo-3's windows and the fused norms (skipped
without CUDA)."""

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


OLMO3 = dataclasses.replace(CONFIG, arch="olmo3", sliding_window=48, layer_norm_eps=1e-6, rope_theta=500000.0)


@pytest.mark.parametrize("config", [CONFIG, OLMO3], ids=["olmo1", "olmo3_window48"])
def test_flash_attention_matches_sdpa(config: ModelConfig) -> None:
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    sdpa = build_model(config, device="cuda").to(torch.bfloat16).eval()
    flash = build_model(dataclasses.replace(config, attention="flash"), device="cuda").to(torch.bfloat16)
    flash.load_state_dict(sdpa.state_dict())
    flash.eval()
    input_ids = torch.randint(0, 1000, (2, 128), device="cuda")
    with torch.no_grad():
        expected, got = sdpa(input_ids).float(), flash(input_ids).float()
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 2e-2


def test_olmo3_triton_kernels_match_torch_references() -> None:
    """The fused RMSNorm (block norms and QK-norm) and RoPE on an OLMo-3 block, forward and backward, in fp32."""
    torch.manual_seed(0)
    reference = build_model(dataclasses.replace(OLMO3, kernels="torch"), device="cuda")
    fused = build_model(dataclasses.replace(OLMO3, kernels="triton"), device="cuda")
    fused.load_state_dict(reference.state_dict())
    input_ids = torch.randint(0, 1000, (2, 128), device="cuda")
    for model in (reference, fused):
        model(input_ids).float().logsumexp(-1).mean().backward()
    expected, got = reference(input_ids).detach(), fused(input_ids).detach()
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4
    for (name, a), b in zip(reference.named_parameters(), fused.parameters()):
        assert ((b.grad - a.grad).abs().max() / a.grad.abs().max()).item() < 1e-3, name


@pytest.mark.parametrize(
    ("dtype", "window", "kernel"),
    [
        (torch.float32, None, "EFFICIENT_ATTENTION"),  # no fp32 flash: k/v expanded for the memory-efficient kernel
        (torch.bfloat16, None, "FLASH_ATTENTION"),  # flash's own GQA, k/v not expanded
        (torch.bfloat16, 48, "EFFICIENT_ATTENTION"),  # a window is a mask, which flash does not take
    ],
)
def test_gqa_attention_runs_on_a_fused_kernel_never_the_math_one(dtype: torch.dtype, window, kernel: str) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megaolmo.model.olmo import causal_attention

    torch.manual_seed(0)
    q = torch.randn(256, 2, 8, 64, device="cuda", dtype=dtype)
    k, v = (torch.randn(256, 2, 2, 64, device="cuda", dtype=dtype) for _ in range(2))
    with sdpa_kernel([getattr(SDPBackend, kernel)]):  # raises if SDPA wanted another kernel (the math one)
        out = causal_attention(q, k, v, "sdpa", window=window)
    with sdpa_kernel([SDPBackend.MATH]):
        kk, vv = (t.repeat_interleave(4, dim=2) for t in (k, v))
        expected = causal_attention(q.double(), kk.double(), vv.double(), "sdpa", window=window)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < tolerance
