"""`python -m megaolmo.bench kernels`: the fused RoPE, SwiGLU, LayerNorm and RMSNorm kernels against the alternatives.

For each op and mode (forward, backward, forward+backward) it reports the
median time (`triton.testing.do_bench`, which flushes L2 before every run, over
inputs rotated between calls), the bandwidth from the bytes the op must move,
that bandwidth as a share of the device-to-device copy bandwidth measured in the
same run, and the speedup against torch eager, `torch.compile` and, when they
import, Liger-Kernel, Transformer Engine and Apex. Peak memory is that of one
forward+backward.
"""

from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megaolmo.config import ModelConfig
from megaolmo.tables import write_rows

OPS = ("layer_norm", "rms_norm", "swiglu", "rope")
MODES = ("forward", "backward", "forward+backward")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROTATION = 4  # distinct input sets cycled through, so no run starts with its inputs in cache


@dataclass
class Case:
    """One op at one shape: how to make inputs, the bytes it moves, and each implementation to time."""

    op: str
    shape: str
    make_inputs: Callable[[], list[torch.Tensor]]
    forward_bytes: int
    backward_bytes: int
    impls: dict[str, Callable[..., object]]


def _outputs(result: object) -> list[torch.Tensor]:
    return [result] if isinstance(result, torch.Tensor) else [t for t in result if isinstance(t, torch.Tensor)]


def cases(config: ModelConfig, tokens: int, dtype: torch.dtype) -> list[Case]:
    """Each op at the shapes one micro-batch of `tokens` tokens gives for this model."""
    from megaolmo.kernels import fused, reference

    seq = min(config.max_sequence_length, tokens)
    batch = max(tokens // seq, 1)
    rows = seq * batch
    d, ffn, hd = config.d_model, config.ffn_hidden_size, config.head_dim
    heads, kv = config.n_heads, config.kv_heads
    size = torch.finfo(dtype).bits // 8
    cos, sin = reference.rope_cos_sin(torch.arange(seq, device="cuda"), hd, config.rope_theta)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)

    def rms_weight() -> torch.Tensor:
        """A trained-looking weight that requires grad, so every implementation computes dweight too."""
        return (torch.randn(d, device="cuda") / 2 + 1).to(dtype).requires_grad_()

    compiled = {name: torch.compile(getattr(reference, name), dynamic=False) for name in OPS if name != "rope"}
    compiled["rope"] = torch.compile(reference.apply_rope, dynamic=False)
    ln_impls = {
        "megaolmo": lambda x: fused.layer_norm(x),
        "torch": lambda x: reference.layer_norm(x),
        "torch.compile": lambda x: compiled["layer_norm"](x),
    }
    rms_impls = {
        "megaolmo": lambda x, w: fused.rms_norm(x, w),
        "torch": lambda x, w: reference.rms_norm(x, w),
        "torch.compile": lambda x, w: compiled["rms_norm"](x, w),
    }
    swiglu_impls = {
        "megaolmo": fused.swiglu,
        "torch": reference.swiglu,
        "torch.compile": lambda x: compiled["swiglu"](x),
    }
    rope_impls = {
        "megaolmo": lambda q, k: fused.apply_rope(q, k, cos, sin),
        "torch": lambda q, k: reference.apply_rope(q, k, cos, sin),
        "torch.compile": lambda q, k: compiled["rope"](q, k, cos, sin),
    }
    add_optional_baselines(ln_impls, rms_impls, swiglu_impls, rope_impls, d, cos, sin, dtype)
    qk_bytes = seq * batch * (heads + kv) * hd * size
    return [
        Case(
            "layer_norm",
            f"[{rows}, {d}]",
            lambda: [randn(rows, d)],
            forward_bytes=2 * rows * d * size + 4 * rows,
            backward_bytes=3 * rows * d * size + 4 * rows,
            impls=ln_impls,
        ),
        Case(
            "rms_norm",
            f"[{rows}, {d}]",
            lambda: [randn(rows, d), rms_weight()],
            forward_bytes=2 * rows * d * size + 4 * rows + d * size,
            backward_bytes=3 * rows * d * size + 4 * rows + 2 * d * size,
            impls=rms_impls,
        ),
        Case(
            "swiglu",
            f"[{rows}, {2 * ffn}] -> [{rows}, {ffn}]",
            lambda: [randn(rows, 2 * ffn)],
            forward_bytes=3 * rows * ffn * size,
            backward_bytes=5 * rows * ffn * size,
            impls=swiglu_impls,
        ),
        Case(
            "rope",
            f"q [{seq}, {batch}, {heads}, {hd}] k [.., {kv}, {hd}]",
            lambda: [randn(seq, batch, heads, hd), randn(seq, batch, kv, hd)],
            forward_bytes=2 * qk_bytes,
            backward_bytes=2 * qk_bytes,
            impls=rope_impls,
        ),
    ]


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - optional baselines may fail to import in many ways (CUDA/ABI mismatches)
        return None


def add_optional_baselines(ln_impls, rms_impls, swiglu_impls, rope_impls, d_model, cos, sin, dtype) -> None:
    """Liger-Kernel, Transformer Engine and Apex, each only when it imports. Their APIs put the gate first
    (Liger, TE) or carry an affine weight (Liger, TE): the bytes moved are the same, which is what is timed.
    TE's and Apex's RMSNorm modules hold their own weight, so they ignore the case's."""
    liger_ln = _try_import("liger_kernel.ops.layer_norm")
    liger_rms = _try_import("liger_kernel.ops.rms_norm")
    liger_swiglu = _try_import("liger_kernel.ops.swiglu")
    liger_rope = _try_import("liger_kernel.ops.rope")
    if liger_ln is not None:
        ones = torch.ones(d_model, device="cuda", dtype=dtype)
        zeros = torch.zeros(d_model, device="cuda", dtype=dtype)
        ln_impls["liger"] = lambda x: liger_ln.LigerLayerNormFunction.apply(x, ones, zeros, 1e-5)
    if liger_rms is not None:
        # Liger's default "llama" casting is OLMo's: x_hat in fp32, cast to x's dtype, then the weight.
        rms_impls["liger"] = lambda x, w: liger_rms.LigerRMSNormFunction.apply(x, w, 1e-6)
    if liger_swiglu is not None and hasattr(liger_swiglu, "LigerFusedGateUpSiLUMulFunction"):
        swiglu_impls["liger"] = lambda x: liger_swiglu.LigerFusedGateUpSiLUMulFunction.apply(x)
    if liger_rope is not None:
        full_cos, full_sin = torch.cat([cos, cos], -1).to(dtype), torch.cat([sin, sin], -1).to(dtype)
        # Liger rotates in place on [b, h, s, d] views of [b, s, h, d] storage: the same bytes per token.
        rope_impls["liger"] = lambda q, k: liger_rope.LigerRopeFunction.apply(
            q.transpose(0, 1).transpose(1, 2), k.transpose(0, 1).transpose(1, 2), full_cos, full_sin
        )
    te = _try_import("transformer_engine.pytorch")
    if te is not None:
        te_ln = te.LayerNorm(d_model, params_dtype=dtype, device="cuda")
        ln_impls["transformer_engine"] = te_ln
        te_rms = te.RMSNorm(d_model, eps=1e-6, params_dtype=dtype, device="cuda")
        rms_impls["transformer_engine"] = lambda x, w: te_rms(x)
        te_rope = _try_import("transformer_engine.pytorch.attention.rope") or _try_import(
            "transformer_engine.pytorch.attention"
        )
        if te_rope is not None and hasattr(te_rope, "apply_rotary_pos_emb"):
            freqs = torch.cat([torch.atan2(sin, cos)] * 2, -1)[:, None, None, :].contiguous()
            rope_impls["transformer_engine"] = lambda q, k: (
                te_rope.apply_rotary_pos_emb(q, freqs, tensor_format="sbhd", fused=True),
                te_rope.apply_rotary_pos_emb(k, freqs, tensor_format="sbhd", fused=True),
            )
        if hasattr(te, "ops") and hasattr(te.ops, "SwiGLU"):
            swiglu_impls["transformer_engine"] = te.ops.SwiGLU()
    apex_norm = _try_import("apex.normalization")
    if apex_norm is not None:
        ln_impls["apex"] = apex_norm.FusedLayerNorm(d_model, elementwise_affine=False, memory_efficient=True).cuda()
        if hasattr(apex_norm, "FusedRMSNorm"):
            apex_rms = apex_norm.FusedRMSNorm(d_model, eps=1e-6, memory_efficient=True).to("cuda", dtype)
            rms_impls["apex"] = lambda x, w: apex_rms(x)


def time_case(case: Case, impl: Callable[..., object], mode: str) -> tuple[float, int]:
    """Median ms of one mode over rotated inputs, and the peak memory (bytes) of one forward+backward."""
    from triton.testing import do_bench

    input_sets = [case.make_inputs() for _ in range(ROTATION)]
    state = {"i": 0}

    def next_inputs() -> list[torch.Tensor]:
        state["i"] = (state["i"] + 1) % ROTATION
        return input_sets[state["i"]]

    if mode == "forward":

        def run() -> None:
            with torch.no_grad():
                impl(*next_inputs())

    elif mode == "backward":
        graphs = []
        for inputs in input_sets:
            outs = _outputs(impl(*inputs))
            graphs.append((outs, [torch.randn_like(o) for o in outs]))

        def run() -> None:
            outs, grads = graphs[state["i"]]
            state["i"] = (state["i"] + 1) % ROTATION
            torch.autograd.backward(outs, grads, retain_graph=True)

    else:

        def run() -> None:
            outs = _outputs(impl(*next_inputs()))
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    grads_to_clear = [t for inputs in input_sets for t in inputs]
    ms = do_bench(run, grad_to_none=grads_to_clear, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    inputs = case.make_inputs()
    outs = _outputs(impl(*inputs))
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    torch.cuda.synchronize()
    return ms, torch.cuda.max_memory_allocated() - base


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth (read + write) of a 1 GiB buffer: the ceiling for memory-bound ops."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / ms / 1e6


def benchmark(args: argparse.Namespace) -> list[dict[str, object]]:
    config = ModelConfig.preset(args.model)
    dtype = DTYPES[args.dtype]
    copy = copy_bandwidth_gbps()
    print(
        f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.0f} GB/s; {args.model}, {args.tokens} tokens, {args.dtype}"
    )
    rows = []
    for case in cases(config, args.tokens, dtype):
        if case.op not in args.ops:
            continue
        for mode in MODES:
            moved = {
                "forward": case.forward_bytes,
                "backward": case.backward_bytes,
                "forward+backward": case.forward_bytes + case.backward_bytes,
            }[mode]
            timings = {}
            for name, impl in case.impls.items():
                try:
                    timings[name] = time_case(case, impl, mode)
                except Exception as err:  # a broken optional baseline must not end the run
                    if name == "megaolmo":
                        raise
                    print(f"  {name} skipped for {case.op} {mode}: {type(err).__name__}: {err}".splitlines()[0])
            ours_ms, ours_peak = timings["megaolmo"]
            gbps = moved / ours_ms / 1e6
            row: dict[str, object] = {
                "op": case.op,
                "shape": case.shape,
                "mode": mode,
                "ms": round(ours_ms, 4),
                "GB/s": round(gbps, 1),
                "%copy": round(100 * gbps / copy, 1),
            }
            for name, (ms, _peak) in timings.items():
                if name != "megaolmo":
                    row[f"x {name}"] = round(ms / ours_ms, 2)
            if mode == "forward+backward":
                row["peak MiB"] = round(ours_peak / 2**20, 1)
                for name, (_ms, peak) in timings.items():
                    if name != "megaolmo":
                        row[f"peak MiB {name}"] = round(peak / 2**20, 1)
            rows.append(row)
    return rows


def smoke_check() -> bool:
    """Without a GPU: each kernel through Triton's interpreter against its torch reference."""
    from megaolmo.kernels import fused, reference

    torch.manual_seed(0)
    x = torch.randn(5, 3, 100, requires_grad=True)
    weight = torch.randn(100) / 2 + 1
    q, k = torch.randn(7, 2, 3, 16), torch.randn(7, 2, 1, 16)
    cos, sin = reference.rope_cos_sin(torch.arange(7), 16, 10000.0)
    checks = {
        "layer_norm": (fused.layer_norm(x), reference.layer_norm(x)),
        "rms_norm": (fused.rms_norm(x, weight), reference.rms_norm(x, weight)),
        "swiglu": (fused.swiglu(x), reference.swiglu(x)),
        "rope": (torch.cat([t.flatten() for t in fused.apply_rope(q, k, cos, sin)]),
                 torch.cat([t.flatten() for t in reference.apply_rope(q, k, cos, sin)])),
    }  # fmt: skip
    ok = True
    for name, (ours, theirs) in checks.items():
        error = (ours - theirs).abs().max().item()
        passed = math.isfinite(error) and error < 1e-5
        ok &= passed
        print(f"  {name:<10} max |triton - torch| = {error:.2e}  {'ok' if passed else 'MISMATCH'}")
    return ok


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: kernel timings need one; checking the kernels through Triton's interpreter instead")
        return 0 if smoke_check() else 1
    rows = benchmark(args)
    write_rows(rows, args.out)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="olmo_7b", help="model preset whose shapes are used (default olmo_7b)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (default 8192)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--out", help="also write the rows to this .csv or .json file")
