"""Two-rank tensor-parallel checks, run in spawned gloo ranks: collectives of a block, and megatron-core parity."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import small_model

from megaolmo.model.olmo import OLMoBlock
from megaolmo.model.rope import rope_tables
from megaolmo.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    layers,
    mappings,
)
from megaolmo.parallel.cross_entropy import vocab_parallel_cross_entropy

SEQ, BATCH = 8, 2
CONFIG = small_model(n_layers=1, kernels="torch")


def count_block_collectives(sequence_parallel: bool) -> dict[str, list]:
    """The collectives (name and output shape) of one block's forward and of its backward."""
    tp = TensorParallel(dist.group.WORLD, sequence_parallel)
    with torch.device("meta"):
        block = OLMoBlock(CONFIG, 0)
    for layer in (block.att_proj, block.attn_out, block.ff_proj, block.ff_out):
        layer.shard(tp)
    block.to_empty(device="cpu")
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.05)
    seq = SEQ // tp.size if sequence_parallel else SEQ
    x = torch.randn(seq, BATCH, CONFIG.d_model, requires_grad=True)
    calls: list[tuple[str, list[int]]] = []
    originals = {name: getattr(mappings, name) for name in ("all_reduce", "all_gather", "reduce_scatter")}

    def counted(name):
        def run(*args, **kwargs):
            out = originals[name](*args, **kwargs)
            calls.append((name, list(out.shape)))
            return out

        return run

    for name in originals:
        setattr(mappings, name, counted(name))
    layers.all_gather = counted("all_gather")
    try:
        out = block(x)
        forward = list(calls)
        calls.clear()
        out.sum().backward()
        backward = list(calls)
    finally:
        for name, fn in originals.items():
            setattr(mappings, name, fn)
        layers.all_gather = originals["all_gather"]
    return {"forward": forward, "backward": backward}


def activation_bytes_per_block() -> tuple[int, int]:
    """Bytes autograd keeps for one bf16 block under TP2 + SP with the fused kernels, and Megatron's bound.

    Parameters and the RoPE tables (shared by every block) are not activations and are left out.
    """
    s, b, h = 32, 2, 64
    config = small_model(d_model=h, n_layers=1, ffn_hidden_size=176, kernels="triton")
    tp = TensorParallel(dist.group.WORLD, sequence_parallel=True)
    with torch.device("meta"):
        block = OLMoBlock(config, 0)
    for layer in (block.att_proj, block.attn_out, block.ff_proj, block.ff_out):
        layer.shard(tp)
    block.to_empty(device="cpu").to(torch.bfloat16)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.05)
    cos, sin = rope_tables(s, config.head_dim, config.rope_theta, torch.device("cpu"))
    not_activations = {t.untyped_storage().data_ptr() for t in [*block.parameters(), cos, sin]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in not_activations:
            storages[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    x = torch.randn(s // tp.size, b, h, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x)
    return sum(storages.values()), 34 * s * b * h // tp.size


def megatron_parity() -> dict[str, float]:
    """Max relative differences between megaolmo's TP layers and megatron-core's, outputs and gradients."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    megatron_config = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True)
    tp = TensorParallel(dist.group.WORLD)
    rank = dist.get_rank()
    torch.manual_seed(0)
    d_in, d_out, vocab = 32, 48, 64
    full_column = torch.randn(d_out, d_in)
    full_row = torch.randn(d_out, d_in)
    full_embedding = torch.randn(vocab, d_in)
    x = torch.randn(SEQ, BATCH, d_in)
    ids = torch.randint(0, vocab, (SEQ, BATCH))
    diffs = {}

    def compare(name, ours_fn, theirs_fn, ours_params, theirs_params, inputs):
        ours_in = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        theirs_in = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        ours_out, theirs_out = ours_fn(*ours_in), theirs_fn(*theirs_in)
        grad = torch.randn_like(ours_out)
        ours_out.backward(grad)
        theirs_out.backward(grad)
        pairs = [(ours_out, theirs_out)] + [(a.grad, b.grad) for a, b in zip(ours_params, theirs_params)]
        pairs += [(a.grad, b.grad) for a, b in zip(ours_in, theirs_in) if a.grad is not None]
        diffs[name] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs)

    column = ColumnParallelLinear(d_in, d_out)
    column.shard(tp)
    column.weight.data.copy_(column.shard_full(full_column))
    their_column = tensor_parallel.ColumnParallelLinear(
        d_in, d_out, config=megatron_config, init_method=torch.nn.init.zeros_, bias=False
    )
    their_column.weight.data.copy_(full_column.chunk(2)[rank])
    compare("column", column, lambda t: their_column(t)[0], [column.weight], [their_column.weight], [x])

    row = RowParallelLinear(d_out, d_in)
    row.shard(tp)
    row.weight.data.copy_(row.shard_full(full_row.t().contiguous()))
    their_row = tensor_parallel.RowParallelLinear(
        d_out, d_in, config=megatron_config, init_method=torch.nn.init.zeros_, bias=False,
        input_is_parallel=True, skip_bias_add=False,
    )  # fmt: skip
    their_row.weight.data.copy_(full_row.t().chunk(2, dim=1)[rank])
    local_in = torch.randn(SEQ, BATCH, d_out // 2)
    compare("row", row, lambda t: their_row(t)[0], [row.weight], [their_row.weight], [local_in])

    embedding = VocabParallelEmbedding(vocab, d_in)
    embedding.shard(tp)
    embedding.weight.data.copy_(embedding.shard_full(full_embedding))
    their_embedding = tensor_parallel.VocabParallelEmbedding(
        vocab, d_in, init_method=torch.nn.init.zeros_, config=megatron_config
    )
    their_embedding.weight.data.copy_(full_embedding.chunk(2)[rank])
    compare("embedding", embedding, their_embedding, [embedding.weight], [their_embedding.weight], [ids])

    logits = torch.randn(SEQ, BATCH, vocab // 2)
    compare(
        "cross_entropy",
        lambda t: vocab_parallel_cross_entropy(t, ids, rank * vocab // 2, group=dist.group.WORLD)[0],
        lambda t: tensor_parallel.vocab_parallel_cross_entropy(t, ids),
        [],
        [],
        [logits],
    )
    parallel_state.destroy_model_parallel()
    return diffs


def run_checks(rank: int, world_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["TRITON_INTERPRET"] = "1"  # these ranks compute on CPU, GPU or not; set before triton is imported
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(out_dir) / 'store'}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    results: dict = {}
    try:
        results["collectives"] = {sp: count_block_collectives(sp == "sp") for sp in ("no_sp", "sp")}
        results["activation_bytes"] = activation_bytes_per_block()
        if importlib.util.find_spec("megatron") is not None:
            results["megatron"] = megatron_parity()
    except Exception:  # noqa: BLE001 - reported by the test that reads the results
        results["error"] = traceback.format_exc()
    finally:
        dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
