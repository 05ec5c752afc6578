"""Triton kernels against float64 references (CPU: Triton's interpreter; GPU: the real thing)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megaolmo import ModelConfig, build_model
from megaolmo.kernels import fused, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEQ, BATCH, HIDDEN, HEAD_DIM, HEADS, KV_HEADS = 37, 2, 1000, 64, 3, 1
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def errors(low, exact) -> float:
    """Max abs difference between a result (or tuple of results) and its float64 counterpart."""
    low, exact = (
        (low,) if isinstance(low, torch.Tensor) else low,
        (exact,) if isinstance(exact, torch.Tensor) else exact,
    )
    return max((a.double() - b).abs().max().item() for a, b in zip(low, exact))


def scale(exact) -> float:
    exact = (exact,) if isinstance(exact, torch.Tensor) else exact
    return max(t.abs().max().item() for t in exact)


def check_op(op_name: str, inputs: list[torch.Tensor], run, dtype: torch.dtype) -> None:
    """Forward and backward of the Triton op against float64; low precision against torch in that dtype."""
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    low_inputs = [t.detach().requires_grad_() for t in inputs]
    ref_inputs = [t.detach().requires_grad_() for t in inputs]
    exact = run(reference, exact_inputs)
    got = run(fused, low_inputs)
    torch_low = run(reference, ref_inputs)
    exact_t = (exact,) if isinstance(exact, torch.Tensor) else exact
    grads = [torch.randn_like(t, dtype=torch.float64) for t in exact_t]
    exact_grad = torch.autograd.grad(exact_t, exact_inputs, grads)
    to = [g.to(dtype) for g in grads]
    got_t = (got,) if isinstance(got, torch.Tensor) else got
    torch_t = (torch_low,) if isinstance(torch_low, torch.Tensor) else torch_low
    got_grad = torch.autograd.grad(got_t, low_inputs, to)
    torch_grad = torch.autograd.grad(torch_t, ref_inputs, to)
    for what, ours, theirs, truth in (
        ("forward", got, torch_low, exact),
        ("backward", got_grad, torch_grad, exact_grad),
    ):
        if dtype == torch.float32:
            assert errors(ours, truth) <= 1e-5 * scale(truth), f"{op_name} {what}"
        else:
            atol = torch.finfo(dtype).eps * scale(truth) / 8
            assert errors(ours, truth) <= 2 * errors(theirs, truth) + atol, f"{op_name} {what} {dtype}"


def rope_runner(cos: torch.Tensor, sin: torch.Tensor):
    """apply_rope over [q, k] with fp32 cos/sin, or float64 ones for the float64 reference."""

    def run(ops, qk):
        wide = qk[0].dtype == torch.float64
        return ops.apply_rope(qk[0], qk[1], cos.double() if wide else cos, sin.double() if wide else sin)

    return run


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(SEQ, BATCH, HIDDEN, device=DEVICE) * 3 + 1).to(dtype)
    check_op("layer_norm", [x], lambda ops, t: ops.layer_norm(t[0], 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(SEQ, BATCH, 2 * HIDDEN, device=DEVICE) * 2).to(dtype)
    check_op("swiglu", [x], lambda ops, t: ops.swiglu(t[0]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, device=DEVICE).to(dtype)
    k = torch.randn(SEQ, BATCH, KV_HEADS, HEAD_DIM, device=DEVICE).to(dtype)
    cos, sin = reference.rope_cos_sin(torch.arange(SEQ, device=DEVICE) + 5, HEAD_DIM, 10000.0)
    check_op("rope", [q, k], rope_runner(cos, sin), dtype)


def test_non_contiguous_inputs() -> None:
    """Strided views (the qkv split, a transposed activation, a stepped slice) give the contiguous result."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE).transpose(0, 1)
    assert torch.allclose(fused.layer_norm(x), reference.layer_norm(x.contiguous()), atol=1e-5)
    wide = torch.randn(SEQ, BATCH, 4 * HIDDEN, device=DEVICE)[..., ::2]
    assert torch.allclose(fused.swiglu(wide), reference.swiglu(wide.contiguous()), atol=1e-6)
    qkv = torch.randn(SEQ, BATCH, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=DEVICE, requires_grad=True)
    q, k, _ = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    q, k = q.view(SEQ, BATCH, HEADS, HEAD_DIM), k.view(SEQ, BATCH, KV_HEADS, HEAD_DIM)
    cos, sin = reference.rope_cos_sin(torch.arange(SEQ, device=DEVICE), HEAD_DIM, 10000.0)
    ours = fused.apply_rope(q, k, cos, sin)
    theirs = reference.apply_rope(q.contiguous(), k.contiguous(), cos, sin)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6)
    grad_ours = torch.autograd.grad(ours, qkv, [torch.ones_like(t) for t in ours])[0]
    grad_theirs = torch.autograd.grad(reference.apply_rope(q, k, cos, sin), qkv, [torch.ones_like(t) for t in ours])[0]
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-6)


def saved_bytes(fn, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd keeps for backward while running fn(x)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


def test_layer_norm_shares_its_saved_output_with_the_next_linear() -> None:
    """Norm then linear, as in every block: the fused norm adds only an fp32 rstd per row to what is saved."""
    torch.manual_seed(0)
    rows, width = SEQ * BATCH, 512
    x = torch.randn(rows, width, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    linear = torch.nn.Linear(width, 64, bias=False, device=DEVICE, dtype=torch.bfloat16)
    fused_bytes = saved_bytes(lambda t: linear(fused.layer_norm(t)), x)
    torch_bytes = saved_bytes(lambda t: linear(reference.layer_norm(t)), x)
    activation = rows * width * 2  # the norm's bf16 output, which the linear saves in both cases
    weight = linear.weight.numel() * 2
    assert fused_bytes == activation + weight + rows * 4
    # The reference keeps an fp32 copy of its input (plus mean and rstd): 2x the bf16 activation, per norm.
    assert torch_bytes - fused_bytes >= rows * width * 4


def test_tiny_model_same_loss_and_gradients_with_triton_and_torch() -> None:
    torch.manual_seed(0)
    config = ModelConfig(d_model=96, n_layers=2, n_heads=3, n_kv_heads=1, ffn_hidden_size=200, vocab_size=500)
    torch_model = build_model(dataclasses.replace(config, kernels="torch"), device=DEVICE)
    triton_model = build_model(dataclasses.replace(config, kernels="triton"), device=DEVICE)
    triton_model.load_state_dict(torch_model.state_dict())
    input_ids = torch.randint(0, 500, (2, 19), device=DEVICE)
    losses = []
    for model in (torch_model, triton_model):
        logits = model(input_ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), input_ids[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss)
    assert abs(losses[0].item() - losses[1].item()) <= 1e-5 * losses[0].item()
    for (name, a), b in zip(torch_model.named_parameters(), triton_model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


def test_cpu_tensors_without_the_interpreter_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused.layer_norm(torch.randn(2, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["layer_norm", "swiglu", "rope"])
def test_large_bf16_shapes_on_gpu(op: str) -> None:
    """OLMo-7B shapes at 8192 tokens, bf16, against torch in bf16."""
    torch.manual_seed(0)
    tokens, hidden, ffn, heads = 8192, 4096, 11008, 32
    if op == "layer_norm":
        x = torch.randn(tokens, 1, hidden, device="cuda", dtype=torch.bfloat16)
        check_op(op, [x], lambda ops, t: ops.layer_norm(t[0], 1e-5), torch.bfloat16)
    elif op == "swiglu":
        x = torch.randn(tokens, 1, 2 * ffn, device="cuda", dtype=torch.bfloat16)
        check_op(op, [x], lambda ops, t: ops.swiglu(t[0]), torch.bfloat16)
    else:
        q = torch.randn(2048, 4, heads, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(2048, 4, heads, 128, device="cuda", dtype=torch.bfloat16)
        cos, sin = reference.rope_cos_sin(torch.arange(2048, device="cuda"), 128, 10000.0)
        check_op(op, [q, k], rope_runner(cos, sin), torch.bfloat16)


@pytest.mark.gpu
def test_64_bit_offsets_past_two_to_the_31_elements() -> None:
    rows, width = 2**31 // 4096 + 8, 4096
    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    y = fused.layer_norm(x)
    tail = x[-4:].float()
    assert torch.allclose(y[-4:].float(), torch.nn.functional.layer_norm(tail, (width,)), atol=2e-2)
    del y
    z = fused.swiglu(x.view(rows, 2, width // 2).flatten(1))
    up, gate = x[-4:].float().chunk(2, -1)
    assert torch.allclose(z[-4:].float(), torch.nn.functional.silu(gate) * up, atol=2e-2, rtol=2e-2)
