"""Triton kernels against float64 references (CPU: Triton's interpreter; GPU: the real thing)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megaolmo import ModelConfig, build_model
from megaolmo.kernels import fused, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEQ, BATCH, HIDDEN, HEAD_DIM, HEADS, KV_HEADS = 37, 2, 1000, 64, 3, 1
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Widths around the power-of-two BLOCK (1, 7, 96, 130, 1000), one row, and more rows than the interpreter's
# backward programs, so some programs sum several rows of dweight and the last one fewer.
RMS_NORM_SHAPES = [(1, 1), (13, 7), (2, 5, 96), (1, 130), (3, 7, 1000)]


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


def coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def check_op(op_name: str, inputs: list[torch.Tensor], run, dtype: torch.dtype) -> None:
    """Forward and backward of the Triton op against float64; low precision against torch in that dtype.

    The results are held, in groups, to the coarser of `dtype` and their own dtype: a bf16 weight's gradient is
    rounded to bf16 even when the activations are fp32.
    """
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
    for what, ours_t, theirs_t, truth_t in (
        ("forward", got_t, torch_t, exact_t),
        ("backward", got_grad, torch_grad, exact_grad),
    ):
        for precision in {coarser(dtype, t.dtype) for t in ours_t}:
            ours, theirs, truth = (
                [t for t, low in zip(results, ours_t) if coarser(dtype, low.dtype) == precision]
                for results in (ours_t, theirs_t, truth_t)
            )
            if precision == torch.float32:
                # Or no worse than torch in fp32: a width-1 RMSNorm's gradient is eps-small, and fp32 cancels it to 0.
                bound = max(1e-5 * scale(truth), 2 * errors(theirs, truth))
                assert errors(ours, truth) <= bound, f"{op_name} {what}"
            else:
                atol = torch.finfo(precision).eps * scale(truth) / 8
                assert errors(ours, truth) <= 2 * errors(theirs, truth) + atol, f"{op_name} {what} {precision}"


@pytest.fixture
def bf16_rounds_to_nearest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the interpreter, fp32 -> bf16 casts round to nearest even, as Triton's casts do on a GPU.

    The interpreter truncates them instead: up to one bf16 ulp per cast where a GPU is off by half of one.
    One cast per result is within check_op's slack, but rms_norm rounds twice (x_hat, then weight * x_hat,
    as OLMo does) and the two truncations add up past twice torch's error.
    """
    if DEVICE == "cuda":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    truncating_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.tensor(src.data).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return truncating_cast(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


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


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RMS_NORM_SHAPES, ids=str)
def test_rms_norm(
    shape: tuple[int, ...], dtype: torch.dtype, weight_dtype: torch.dtype, bf16_rounds_to_nearest: None
) -> None:
    """Forward, dx and dweight; the weight in fp32 (a master weight) or bf16, whatever x's dtype."""
    torch.manual_seed(0)
    x = (torch.randn(*shape, device=DEVICE) * 3 + 1).to(dtype)
    weight = (torch.randn(shape[-1], device=DEVICE) / 2 + 1).to(weight_dtype)
    check_op("rms_norm", [x, weight], lambda ops, t: ops.rms_norm(t[0], t[1], 1e-6), dtype)


def test_rms_norm_of_no_rows() -> None:
    """An empty batch gives an empty output and dx, and a zero dweight in the weight's dtype."""
    x = torch.randn(0, 3, 96, device=DEVICE, requires_grad=True)
    weight = torch.ones(96, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = fused.rms_norm(x, weight)
    assert y.shape == x.shape and y.dtype == x.dtype
    dx, dweight = torch.autograd.grad(y, (x, weight), torch.ones_like(y))
    assert dx.shape == x.shape
    assert dweight.dtype == torch.bfloat16 and torch.equal(dweight, torch.zeros_like(weight))


def test_rms_norm_rejects_a_weight_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match="expected \\(96,\\)"):
        fused.rms_norm(torch.randn(4, 96, device=DEVICE), torch.ones(95, device=DEVICE))


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_per_token(dtype: torch.dtype, bf16_rounds_to_nearest: None) -> None:
    """cos/sin per token [s, b, hd / 2], as intra-document attention gives them: positions restarting in each
    document, other documents in each row."""
    torch.manual_seed(0)
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, device=DEVICE).to(dtype)
    k = torch.randn(SEQ, BATCH, KV_HEADS, HEAD_DIM, device=DEVICE).to(dtype)
    positions = torch.stack([torch.arange(SEQ) % 11, torch.arange(SEQ) % 5], dim=1)  # documents of 11, of 5
    cos, sin = reference.rope_cos_sin(positions.flatten().to(DEVICE), HEAD_DIM, 10000.0)
    per_token = cos.view(SEQ, BATCH, -1), sin.view(SEQ, BATCH, -1)
    check_op("rope per token", [q, k], rope_runner(*per_token), dtype)


def test_rope_shared_table_is_its_rows_per_token_bit_for_bit() -> None:
    """The [s, hd / 2] table the batch shares and the same rows given per token rotate to the same bits, forward
    and backward, in the kernel and in the reference; a table of another shape is refused."""
    torch.manual_seed(0)
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, device=DEVICE, requires_grad=True)
    k = torch.randn(SEQ, BATCH, KV_HEADS, HEAD_DIM, device=DEVICE, requires_grad=True)
    shared = reference.rope_cos_sin(torch.arange(SEQ, device=DEVICE) + 5, HEAD_DIM, 10000.0)
    per_token = [t[:, None].expand(SEQ, BATCH, -1).contiguous() for t in shared]
    grads = [torch.randn_like(q), torch.randn_like(k)]
    for ops in (fused, reference):
        results = []
        for cos, sin in (shared, per_token):
            out = ops.apply_rope(q, k, cos, sin)
            results.append((*out, *torch.autograd.grad(out, (q, k), grads)))
        for a, b in zip(*results):
            assert torch.equal(a, b), ops.__name__
    with pytest.raises(ValueError, match="or per token"):
        fused.apply_rope(q, k, per_token[0][:, :1], per_token[1][:, :1])


def test_non_contiguous_inputs() -> None:
    """Strided views (the qkv split, a transposed activation, a stepped slice) give the contiguous result."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE).transpose(0, 1)
    assert torch.allclose(fused.layer_norm(x), reference.layer_norm(x.contiguous()), atol=1e-5)
    weight = torch.randn(HIDDEN, device=DEVICE) / 2 + 1
    assert torch.allclose(fused.rms_norm(x, weight), reference.rms_norm(x.contiguous(), weight), atol=1e-5)
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


def test_rms_norm_of_strided_rows_as_in_qk_norm() -> None:
    """OLMo-2's QK-norm normalizes q, a slice of the fused qkv output whose rows are strided past their width:
    both kernels read those rows in place through their stride. The gradient comes transposed, too."""
    torch.manual_seed(0)
    width = HEADS * HEAD_DIM
    qkv = torch.randn(SEQ, BATCH, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=DEVICE, requires_grad=True)
    weight = (torch.randn(width, device=DEVICE) / 2 + 1).requires_grad_()
    q = qkv[..., :width]
    dy = torch.randn(BATCH, SEQ, width, device=DEVICE).transpose(0, 1)
    ours, theirs = fused.rms_norm(q, weight), reference.rms_norm(q, weight)
    assert torch.allclose(ours, theirs, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, (qkv, weight), dy), torch.autograd.grad(theirs, (qkv, weight), dy)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


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


def test_rms_norm_saves_only_its_input_and_an_fp32_rstd_per_row() -> None:
    """The input (a view, no copy), the weight, and 4 bytes per row: no fp32 copy of the activation."""
    torch.manual_seed(0)
    rows, width = SEQ * BATCH, 512
    x = torch.randn(rows, width, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(width, device=DEVICE, requires_grad=True)
    fused_bytes = saved_bytes(lambda t: fused.rms_norm(t, weight), x)
    torch_bytes = saved_bytes(lambda t: reference.rms_norm(t, weight), x)
    assert fused_bytes == rows * width * 2 + width * 4 + rows * 4
    # The reference keeps an fp32 copy of x and the bf16 x_hat its weight multiplied: 3x the bf16 activation.
    assert torch_bytes > 3 * rows * width * 2


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
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "swiglu", "rope"])
def test_large_bf16_shapes_on_gpu(op: str) -> None:
    """OLMo-7B shapes at 8192 tokens, bf16, against torch in bf16."""
    torch.manual_seed(0)
    tokens, hidden, ffn, heads = 8192, 4096, 11008, 32
    if op == "layer_norm":
        x = torch.randn(tokens, 1, hidden, device="cuda", dtype=torch.bfloat16)
        check_op(op, [x], lambda ops, t: ops.layer_norm(t[0], 1e-5), torch.bfloat16)
    elif op == "rms_norm":
        x = torch.randn(tokens, 1, hidden, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(hidden, device="cuda") / 2 + 1
        check_op(op, [x, weight], lambda ops, t: ops.rms_norm(t[0], t[1], 1e-6), torch.bfloat16)
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
    weight = torch.randn(width, device="cuda") / 2 + 1
    y = fused.rms_norm(x, weight)
    assert torch.allclose(y[-4:].float(), reference.rms_norm(tail, weight), atol=5e-2)
    del y
    z = fused.swiglu(x.view(rows, 2, width // 2).flatten(1))
    up, gate = x[-4:].float().chunk(2, -1)
    assert torch.allclose(z[-4:].float(), torch.nn.functional.silu(gate) * up, atol=2e-2, rtol=2e-2)
