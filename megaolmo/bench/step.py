"""`python -m megaolmo.bench step`: a full training step, side by side for each local GEMM and for transformers.

For a model preset, micro-batch size and sequence length it times forward,
backward and the AdamW step of megaolmo with every linear backend this machine
has (torch, torchao FP8, Transformer Engine FP8), and of Hugging Face's
OlmoForCausalLM (Olmo2ForCausalLM or Olmo3ForCausalLM for the later
generations) on the same weights and batch, in one run: tokens/s, model
TFLOP/s (megaolmo.model.flops: 6N plus attention, windows counted), MFU and peak memory. Under torchrun
it measures the layout given by --tp/--pp (no transformers column then).
Where the device has no FP8 GEMM (CPU, GPUs below sm_89) torchao's FP8 is
emulated, high-precision matmuls after the float8 casts: its row is named
"megaolmo torchao (emulated FP8)", a check of the wiring, not FP8's speed.
Then a row per throughput lever (`--levers`): compiled blocks (model.compile), the loss a chunk of
tokens at a time (trainer.loss_chunk_tokens) and, under torchrun with data parallelism, the FP8
all-gather (fp8.all_gather) and context parallelism (the same ranks as a CP ring over each row instead of
data-parallel ranks over the rows: the same tokens per rank); `step peak MiB` is what one step allocates
above what lives before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megaolmo.config import ClusterConfig, Fp8Config, ModelConfig, ParallelConfig
from megaolmo.convert.hf import config_to_hf, state_to_hf
from megaolmo.model.engine import ParallelOLMo
from megaolmo.model.flops import flops_per_token, peak_flops_per_device, peak_memory_gib
from megaolmo.model.fp8 import apply_tf32, has_fp8_gemm, precompute_fp8_scales
from megaolmo.parallel.launch import init_distributed, is_rank_zero, launch_world_size, shutdown
from megaolmo.tables import write_rows

LEVERS = ("compile", "chunked-loss", "fp8-all-gather", "context-parallel")


def default_levers(device: torch.device) -> list[str]:
    """Every lever on a GPU; on CPU all but compile, whose first step (inductor generating C++) takes longer
    than the rest of the benchmark: `--levers compile ...` asks for it."""
    return list(LEVERS) if device.type == "cuda" else [lever for lever in LEVERS if lever != "compile"]


def available_linears(device: torch.device) -> list[str]:
    """torch; torchao wherever it is installed (emulated without an FP8 GEMM); TE on FP8 GPUs."""
    linears = ["torch"]
    if importlib.util.find_spec("torchao") is not None:
        linears.append("torchao")
    if importlib.util.find_spec("transformer_engine") is not None and has_fp8_gemm(device):
        linears.append("te")
    return linears


def _timed(step, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds of one step after warm-up."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def megaolmo_step(
    config: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype, ids: torch.Tensor, micro: int, **options
):
    """A training step of megaolmo on `ids`; `options` go to ParallelOLMo (a lever such as loss_chunk_tokens)."""
    model = ParallelOLMo(config, parallel, seed=0, param_dtype=dtype, **options)
    fp8 = options.get("fp8") or Fp8Config()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=model.mesh.device.type == "cuda")
    labels = torch.roll(ids, -1, dims=1)
    share = ids.shape[0] // model.mesh.dp
    rows = slice(model.mesh.dp_rank * share, (model.mesh.dp_rank + 1) * share)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.forward_backward(ids[rows], labels[rows], micro_batch_size=micro)
        model.clip_grad_norm_(1.0)
        optimizer.step()
        precompute_fp8_scales(model.stages, fp8)  # with fp8.all_gather, as the training loop does

    return model, step


def transformers_step(model: ParallelOLMo, dtype: torch.dtype, ids: torch.Tensor):
    """The generation's transformers model (OlmoForCausalLM, Olmo2ForCausalLM or Olmo3ForCausalLM) with exactly
    megaolmo's weights on the same batch, in transformers' usual mixed precision (autocast for bf16)."""
    import transformers

    config = model.config
    hf_config = config_to_hf(config, torch.float32)
    hf_config.pop("torch_dtype")
    hf_config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).to(model.mesh.device)
    hf.load_state_dict(state_to_hf(config, model.full_tensors()), strict=False)
    optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=model.mesh.device.type == "cuda")
    ids = ids.to(model.mesh.device)
    labels = torch.roll(ids, -1, dims=1)
    autocast = torch.autocast(model.mesh.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = hf(ids).logits
        F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()

    return step


def run(args: argparse.Namespace) -> int:
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    init_distributed(device_type)  # under torchrun, binds this rank to cuda:LOCAL_RANK before any CUDA work
    apply_tf32(args.tf32, device_type)
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    preset = args.model or ("olmo_1b" if device_type == "cuda" else "olmo_tiny")
    config = ModelConfig.preset(preset, n_layers=args.layers) if args.layers else ModelConfig.preset(preset)
    seq_len = args.seq_len or config.max_sequence_length
    parallel = ParallelConfig(tp=args.tp, pp=args.pp, sequence_parallel=args.tp > 1)
    world = launch_world_size()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.precision or ("bf16" if device_type == "cuda" else "fp32")
    ]
    dp = world // (args.tp * args.pp)
    # One micro-batch per pipeline stage and data-parallel rank: the smallest batch that fills the pipeline.
    batch = args.micro_batch_size * args.pp * dp
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()
    peak = peak_flops_per_device(ClusterConfig(peak_tflops=args.peak_tflops), device, dtype) * world
    step_flops = flops_per_token(config, seq_len) * tokens
    rows: list[dict] = []
    baseline = None

    def measure(
        name: str, model_config: ModelConfig, layout: ParallelConfig = parallel, **options
    ) -> tuple[ParallelOLMo, object]:
        """Time megaolmo's step with this model, layout and these engine options, and add its row."""
        nonlocal baseline
        reset_peak_memory(device)
        model, step = megaolmo_step(model_config, layout, dtype, ids, args.micro_batch_size, **options)
        seconds = _timed(step, args.steps, args.warmup, device)
        baseline = baseline or seconds
        name += " (emulated FP8)" if model.fp8_emulated else ""
        row = _row(name, seconds, tokens, step_flops, peak, baseline, device)
        rows.append({**row, "step peak MiB": round(step_peak_bytes(step, device) / 2**20, 1)})
        return model, step

    linears = [linear for linear in args.linears if linear in available_linears(device)]
    for linear in linears:
        model, step = measure(f"megaolmo {linear}", dataclasses.replace(config, linear=linear))
        hf_step = None
        if linear == "torch" and world == 1 and args.transformers:
            if importlib.util.find_spec("transformers") is None:  # an optional column: say so, time the rest
                rows.append({"implementation": "transformers", "note": "skipped: transformers is not installed"})
            else:
                hf_step = transformers_step(model, dtype, ids)
        del model, step  # megaolmo's weights and AdamW state count in no later row's peak
        if hf_step is not None:
            reset_peak_memory(device)
            hf_seconds = _timed(hf_step, args.steps, args.warmup, device)
            row = _row("transformers", hf_seconds, tokens, step_flops, peak, baseline, device)
            rows.append({**row, "step peak MiB": round(step_peak_bytes(hf_step, device) / 2**20, 1)})
            del hf_step
    # The throughput levers, each on megaolmo's torch GEMMs beside the plain row above.
    levers = args.levers if args.levers is not None else default_levers(device)
    if "compile" in levers:  # the first (warm-up) step compiles; the timed ones run the compiled blocks
        measure("megaolmo torch, compiled blocks", dataclasses.replace(config, compile=True))
    if "chunked-loss" in levers:
        chunk = args.loss_chunk_tokens
        measure(f"megaolmo torch, loss {chunk} tokens at a time", config, loss_chunk_tokens=chunk)
    if "fp8-all-gather" in levers and "torchao" in linears:
        name = "megaolmo torchao, FP8 all-gather"
        if dp > 1:
            measure(name, dataclasses.replace(config, linear="torchao"), fp8=Fp8Config(all_gather=True))
        else:  # FSDP gathers nothing on one data-parallel rank
            rows.append({"implementation": name, "note": "skipped: needs data parallelism (torchrun, dp > 1)"})
    if "context-parallel" in levers:  # the data-parallel ranks split each row instead: the same tokens per rank
        if dp > 1:
            measure(f"megaolmo torch, cp{dp} for dp{dp} (ring attention)", config, dataclasses.replace(parallel, cp=dp))
        else:
            name, note = "megaolmo torch, context parallelism", "skipped: needs several data-parallel ranks (torchrun)"
            rows.append({"implementation": name, "note": note})
    if is_rank_zero():
        where = (
            torch.cuda.get_device_name(device) if device_type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        )
        print(f"{where}: {preset}, {world} rank(s) tp={args.tp} pp={args.pp}, micro-batch {args.micro_batch_size} x "
              f"{seq_len} tokens, {str(dtype).removeprefix('torch.')}, median of {args.steps} steps")  # fmt: skip
        write_rows(rows, args.out)
    shutdown(clean=True)
    return 0


def step_peak_bytes(step, device: torch.device) -> int:
    """The most memory one more step allocates above what is alive before it (activations, gradients,
    temporaries): CUDA's allocator peak, or on CPU the tensors' allocations and frees that torch.profiler
    records, added up in time order (the resident-set peak of a CPU process cannot be reset between rows)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as directory:  # the allocations, with their sizes, are in the trace
        trace = Path(directory) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    changes = sorted((e["ts"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]")
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


def reset_peak_memory(device: torch.device) -> None:
    """Start a row's peak-memory count afresh on this rank's GPU, so each row reports its own peak.

    On CPU the peak is the process's resident-set high-water mark, which cannot be reset: CPU rows
    report the peak of the run so far.
    """
    if device.type == "cuda":
        gc.collect()  # the previous row's model may sit in reference cycles (module hooks)
        torch.cuda.reset_peak_memory_stats(device)


def _row(name, seconds, tokens, step_flops, peak, baseline, device) -> dict[str, object]:
    return {
        "implementation": name,
        "step s": round(seconds, 4),
        "tokens/s": round(tokens / seconds),
        "TFLOP/s": round(step_flops / seconds / 1e12, 3),
        "MFU %": round(100 * step_flops / seconds / peak, 1),
        "speed vs megaolmo torch": round(baseline / seconds, 2),
        "peak GiB": round(peak_memory_gib(device), 2),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model preset (default olmo_1b on a GPU, olmo_tiny on CPU)")
    parser.add_argument("--layers", type=int, help="override the preset's number of layers (to fit one device)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's maximum)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--linears", nargs="+", default=["torch", "torchao", "te"], help="local GEMMs to compare")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--peak-tflops", type=float, help="datasheet peak per device for MFU (default: measured)")
    parser.add_argument("--no-transformers", dest="transformers", action="store_false",
                        help="skip the transformers column (Olmo, Olmo2 or Olmo3ForCausalLM)")  # fmt: skip
    parser.add_argument("--levers", nargs="*", choices=LEVERS,
                        help="throughput levers, a row each beside plain megaolmo torch (default: all; on CPU all "
                             "but compile)")  # fmt: skip
    parser.add_argument("--loss-chunk-tokens", type=int, default=1024,
                        help="the chunked-loss row's trainer.loss_chunk_tokens")  # fmt: skip
    parser.add_argument("--out", help="also write the rows to this .csv or .json file")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false",
                        help="fp32 matmuls in full fp32 on CUDA (default: TF32, as trainer.tf32)")  # fmt: skip
