"""`model.compile=true`: compiled blocks train as eager does, and compile once, not once per step.

One process runs inductor (the C++ code it generates for CPU) through `model.compile=true`. The Triton
kernels (custom ops the compiler calls without tracing into) and the 3D layouts (8 gloo ranks, one spawn) run
with aot_eager: the same graph capture (TP/SP mappings, pipeline stages, FSDP2, checkpointed blocks, document
masks, custom ops) without inductor's code generation, which costs each rank most of a minute on a CPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from compile_worker import Layout, one_process, run_layouts, unique_graphs
from gloo_groups import spawn
from helpers import small_model

from megaolmo import build_model
from megaolmo.config import ConfigError, ModelConfig, ParallelConfig, resolve_layout
from megaolmo.model.parallelize import apply_compile

TOLERANCE = 1e-5  # fp32: the compiled graphs reorder and fuse the same arithmetic

LAYOUTS = [
    # OLMo-3 (GQA, windows, YaRN, QK-norm over TP), SP, 1F1B, ZeRO-3, the attention core recomputed, documents.
    Layout(
        "tp2_pp2_dp2_sp_selective_docs",
        "olmo3",
        {"tp": 2, "pp": 2, "dp": 2, "sequence_parallel": True, "activation_checkpointing": "selective"},
        document_masking=True,
    ),
    # OLMo-2 tied, interleaved 1F1B over 4 virtual stages, ZeRO-2, whole blocks recomputed.
    Layout(
        "tp2_pp2_vp2_dp2_zero2_full",
        "olmo2_tied",
        {
            "tp": 2, "pp": 2, "vp": 2, "dp": 2, "pp_schedule": "interleaved_1f1b",
            "reshard_after_forward": False, "activation_checkpointing": "full",
        },
    ),
]  # fmt: skip


def assert_same_training(records: dict) -> None:
    eager, compiled = records["eager"], records["compiled"]
    assert compiled["ce"] == pytest.approx(eager["ce"], rel=TOLERANCE), (eager["ce"], compiled["ce"])
    assert compiled["eval_nll"] == pytest.approx(eager["eval_nll"], rel=TOLERANCE)
    for name, grad in eager["grads"].items():
        torch.testing.assert_close(compiled["grads"][name], grad, rtol=TOLERANCE, atol=TOLERANCE, msg=name)
    assert eager["graphs"] == [0] * len(eager["graphs"])


def assert_compiles_once(graphs: list[int]) -> None:
    """Graphs after each training step, then after the evaluation: one per kind of block in the stage (an
    OLMo-3 stage has sliding and full blocks) at step 1 and none after it; the evaluation (no grad, a batch of
    another shape, compiled dynamic) adds one per kind at most."""
    first, *later, evaluation = graphs
    assert first > 0
    assert later == [first] * len(later), graphs
    assert evaluation <= 2 * first, graphs


# Inductor's async-TP pass looks for SP's collectives next to the GEMMs: OLMo-2 (QK-norm, SP norm weights), TP2.
PATTERNS = Layout("async_tp_patterns", "olmo2_tied", {"tp": 2, "sequence_parallel": True}, async_tp_patterns=True)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("compile")
    layouts = [*LAYOUTS, PATTERNS]
    spawn(run_layouts, (8, [dataclasses.asdict(layout) for layout in layouts], str(out)), 8)
    found = {}
    for layout in layouts:
        errors = sorted((out / layout.name).glob("rank*.error"))
        if errors:
            pytest.fail(errors[0].read_text())
        found[layout.name] = [torch.load(out / layout.name / f"rank{r}.pt") for r in range(layout.world_size)]
    return found


def test_sp_collectives_sit_where_async_tp_fuses_them(spawned: dict[str, dict]) -> None:
    """In a compiled OLMo-2 block's forward (TP2, SP), both all-gathers feed one GEMM each (att_proj, ff_proj)
    and both reduce-scatters take a GEMM's output (attn_out, ff_out): the pairs parallel.async_tp overlaps.
    A permutation in between, even an identity one, would leave the pass nothing to fuse."""
    for found in spawned[PATTERNS.name]:
        assert found == {"gather_matmuls": [1, 1], "scatter_from_matmul": [True, True]}, found


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_compiled_3d_layouts_train_as_eager(spawned: dict[str, dict], layout: Layout) -> None:
    for records in spawned[layout.name]:
        assert_same_training(records)
        assert_compiles_once(records["compiled"]["graphs"])


def test_inductor_blocks_train_as_eager_and_compile_once() -> None:
    """`model.compile=true` on one process: inductor's code for the whole OLMo-2 block, forward and backward."""
    records = one_process(Layout("one", "olmo2_tied", micro_batch_size=2))
    assert_same_training(records)
    assert_compiles_once(records["compiled"]["graphs"])


@pytest.mark.parametrize("arch", ["olmo1", "olmo2"])
def test_triton_kernels_compile_as_opaque_custom_ops(arch: str) -> None:
    """The four Triton kernels (OLMo-1's LayerNorm; OLMo-2's RMSNorms, QK-norm as one; RoPE and SwiGLU in both)
    are custom ops: the compiler captures the block in one graph around them, their fake implementations
    giving it the shapes, and calls them as eager does, here through Triton's interpreter, which no compiler
    can trace into. One block forward and backward, twice: the second compiles nothing."""
    eps = {"layer_norm_eps": 1e-6} if arch == "olmo2" else {}
    stage = build_model(small_model(arch=arch, n_layers=1, max_sequence_length=16, kernels="triton", **eps), seed=3)
    block = stage.blocks["0"]
    x = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def forward_backward() -> list[torch.Tensor]:
        for tensor in (x, *block.parameters()):
            tensor.grad = None
        out = block(x)
        out.square().sum().backward()
        return [out.detach(), x.grad, *(param.grad for param in block.parameters())]

    eager = forward_backward()
    torch._dynamo.reset()
    apply_compile(stage, fullgraph=True, backend="aot_eager")
    before = unique_graphs()
    for _ in range(2):
        compiled = forward_backward()
        assert unique_graphs() - before == 1
        for a, b in zip(compiled, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=TOLERANCE, atol=TOLERANCE)
    torch._dynamo.reset()


def test_compile_is_a_runtime_field() -> None:
    """A run resumes or initializes from a checkpoint with compile switched on or off."""
    from megaolmo.checkpoint.sharded import RUNTIME_FIELDS

    assert "compile" in RUNTIME_FIELDS


def test_async_tp_refuses_what_it_cannot_overlap() -> None:
    model = ModelConfig(d_model=64, n_heads=4, ffn_hidden_size=96, vocab_size=256, compile=True)
    cases = {
        "model.compile": (dataclasses.replace(model, compile=False), {"tp": 2, "sequence_parallel": True}, 2),
        "parallel.tp": (model, {"sequence_parallel": True}, 1),
        "sequence_parallel": (model, {"tp": 2}, 2),
    }
    for needed, (config, parallel, world) in cases.items():
        with pytest.raises(ConfigError, match=needed):
            resolve_layout(config, ParallelConfig(async_tp=True, **parallel), world)


def test_async_tp_refuses_cpu() -> None:
    from megaolmo.model.parallelize import apply_async_tp
    from megaolmo.parallel.mesh import ParallelMesh

    with pytest.raises(ConfigError, match="needs CUDA"):
        apply_async_tp(ParallelMesh(ParallelConfig(device="cpu")))


def test_planner_hides_a_stated_share_of_tp_under_async_tp() -> None:
    from megaolmo.plan import Layout, Workload, make_plan
    from megaolmo.plan.hardware import Hardware
    from megaolmo.plan.timing import ASYNC_TP_HIDDEN

    model = ModelConfig(d_model=256, n_heads=4, ffn_hidden_size=704, vocab_size=1024, compile=True)
    work = Workload(model, 128, 16, False, "cpu", "torch", False, False)
    hardware = Hardware(
        name="test", device_name="test", device="cpu", devices_per_node=4, nodes=1, peak_flops=1e12,
        memory_bytes=2**34, capacity_bytes=2**34, hbm_bytes_per_s=1e11, intra_node_bytes_per_s=1e10,
        inter_node_bytes_per_s=1e9, matmul_efficiency=0.5,
    )  # fmt: skip
    layout = Layout(tp=2, micro_batch_size=4, sequence_parallel=True)
    exposed = make_plan(work, layout, hardware).step.microbatch
    overlapped = make_plan(work, dataclasses.replace(layout, async_tp=True), hardware).step.microbatch
    assert exposed.tp > 0
    assert overlapped.tp == pytest.approx((1 - ASYNC_TP_HIDDEN) * exposed.tp)
    assert overlapped.compute == exposed.compute
