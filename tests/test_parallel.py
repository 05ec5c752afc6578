"""Every TP x PP x DP layout (degrees 1, 2, 4; at most 8 ranks) trains exactly like one process (CPU, gloo, fp32),
and so do the context-parallel layouts (cp 2 and 4, with TP, PP and DP, and all four at 16 ranks).

Each layout trains an OLMo-1 model and, as its `_olmo3` twin, an OLMo-3 one (OLMo-2's block with QK-norm, sliding
windows and YaRN); the sequence-parallel layouts an OLMo-2 one with a tied embedding besides. The `docs_` layouts
train with document masking on rows of several EOS-separated documents, against one process masking them too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gloo_groups import spawn, spawned_results
from parallel_worker import Layout, reference, run_layouts


def _layouts() -> list[Layout]:
    layouts = []
    for tp in (1, 2, 4):
        for pp in (1, 2, 4):
            for dp in (1, 2, 4):
                if tp * pp * dp > 8 or tp * pp * dp == 1:
                    continue
                model = "tied" if (tp + pp + dp) % 2 else "untied_gqa"
                micro = 2 if pp == 1 and dp < 4 else 1  # gradient accumulation without PP, micro-batches with it
                layouts.append(Layout(f"tp{tp}_pp{pp}_dp{dp}", model, {"tp": tp, "pp": pp, "dp": dp}, micro))
    extra = [
        Layout("tp2_sp", "tied", {"tp": 2, "sequence_parallel": True}, 2),
        Layout("tp4_sp_untied", "untied_gqa", {"tp": 4, "sequence_parallel": True}, 2),
        Layout("tp2_pp2_dp2_sp_tied", "tied", {"tp": 2, "pp": 2, "dp": 2, "sequence_parallel": True}),
        Layout("tp2_pp2_dp2_sp_untied", "untied_gqa", {"tp": 2, "pp": 2, "dp": 2, "sequence_parallel": True}),
        Layout("pp2_vp2_dp2_interleaved", "tied", {"pp": 2, "dp": 2, "vp": 2, "pp_schedule": "interleaved_1f1b"}),
        Layout(
            "tp2_pp2_vp2_sp_interleaved",
            "untied_gqa",
            {"tp": 2, "pp": 2, "vp": 2, "pp_schedule": "interleaved_1f1b", "sequence_parallel": True},
        ),
        Layout("pp2_gpipe_uneven", "untied_gqa", {"pp": 2, "pp_schedule": "gpipe", "pp_layer_split": [1, 3]}),
        Layout("tp2_dp2_zero2_full_ckpt", "tied", {"tp": 2, "dp": 2, "reshard_after_forward": False,
                                                    "activation_checkpointing": "full"}, 2),
        Layout("tp2_sp_pp2_selective_ckpt", "tied", {"tp": 2, "pp": 2, "sequence_parallel": True,
                                                      "activation_checkpointing": "selective"}),
    ]  # fmt: skip
    # Document masking: the masks are per full sequence under SP, the documents reach every pipeline stage
    # (1F1B, interleaved) with its micro-batch, and recomputes (full, selective) see their micro-batch's. Their
    # batch also masks targets (a label mask, a filtered instance): the loss is the mean over the masked-in
    # targets of the whole global batch, however micro-batches and DP ranks split them.
    documents = [
        Layout("docs_tp2_sp", "tied", {"tp": 2, "sequence_parallel": True}, 2),
        Layout("docs_pp2_1f1b", "untied_gqa", {"pp": 2}, 2),
        Layout("docs_tp2_pp2_dp2_sp", "tied", {"tp": 2, "pp": 2, "dp": 2, "sequence_parallel": True}),
        Layout("docs_pp2_vp2_dp2_interleaved", "untied_gqa", {"pp": 2, "dp": 2, "vp": 2,
                                                              "pp_schedule": "interleaved_1f1b"}),
        Layout("docs_tp2_dp2_full_ckpt", "tied", {"tp": 2, "dp": 2, "activation_checkpointing": "full"}, 2),
        Layout("docs_tp2_sp_pp2_selective_ckpt", "untied_gqa", {"tp": 2, "pp": 2, "sequence_parallel": True,
                                                                "activation_checkpointing": "selective"}),
    ]  # fmt: skip
    # The loss a few tokens of logits at a time (5 of a micro-batch's 16 or 32: the last chunk shorter), against
    # one process forming the whole logits: a tied head under SP (gathered input), an untied one (its input kept
    # as the sequence shard, regathered in backward), with a pipeline and document masks.
    chunked = [
        Layout("chunked_loss_tp2_pp2_dp2_sp", "tied", {"tp": 2, "pp": 2, "dp": 2, "sequence_parallel": True},
               loss_chunk_tokens=5),
        Layout("chunked_loss_tp2_sp_untied", "untied_gqa", {"tp": 2, "sequence_parallel": True}, 2,
               loss_chunk_tokens=5),
        Layout("chunked_loss_docs_pp2_dp2", "untied_gqa", {"pp": 2, "dp": 2}, document_masking=True,
               loss_chunk_tokens=5),
        Layout("chunked_loss_docs_cp2_tp2_sp_olmo3", "olmo3", {"cp": 2, "tp": 2, "sequence_parallel": True}, 2,
               document_masking=True, loss_chunk_tokens=5),
    ]  # fmt: skip
    layouts += extra + [dataclasses.replace(layout, document_masking=True) for layout in documents]
    twins = [dataclasses.replace(layout, name=f"{layout.name}_olmo3", model="olmo3") for layout in layouts]
    olmo2 = [
        dataclasses.replace(layout, name=f"{layout.name}_olmo2", model="olmo2_tied")
        for layout in extra
        if layout.parallel.get("sequence_parallel")
    ]
    return layouts + twins + olmo2 + chunked + context_parallel_layouts()


def context_parallel_layouts() -> list[Layout]:
    """CP over 16-token rows: at cp 4 each rank holds two 2-token chunks, so OLMo-3's window of 5 keys spans
    chunks and ring steps and skips some pairs whole. cp 2 and 4 and cp 2 with TP, PP or DP train OLMo-1 and
    OLMo-3, each with document masking (`docs_`) and without; all four degrees at once (16 ranks) train OLMo-1
    without and OLMo-3 with documents; the interleaved schedule, ZeRO-2 and both recomputes run the ring inside
    them with documents and windows."""
    core = [
        Layout("cp2", "tied", {"cp": 2}, 2),
        Layout("cp4", "untied_gqa", {"cp": 4}, 2),
        Layout("cp2_tp2_sp", "tied", {"cp": 2, "tp": 2, "sequence_parallel": True}, 2),
        Layout("cp2_pp2_1f1b", "untied_gqa", {"cp": 2, "pp": 2}),
        Layout("cp2_dp2", "tied", {"cp": 2, "dp": 2}, 2),
    ]
    layouts = []
    for layout in core:
        for model in (layout.model, "olmo3"):
            suffix = "_olmo3" if model == "olmo3" else ""
            layouts.append(dataclasses.replace(layout, name=f"{layout.name}{suffix}", model=model))
            layouts.append(dataclasses.replace(layout, name=f"docs_{layout.name}{suffix}", model=model,
                                               document_masking=True))  # fmt: skip
    all_four = {"tp": 2, "cp": 2, "pp": 2, "dp": 2, "sequence_parallel": True}
    return layouts + [
        Layout("tp2_cp2_pp2_dp2_sp", "untied_gqa", all_four),
        Layout("docs_tp2_cp2_pp2_dp2_sp_olmo3", "olmo3", all_four, document_masking=True),
        Layout("docs_cp2_tp2_pp2_vp2_interleaved_olmo3", "olmo3", {"cp": 2, "tp": 2, "pp": 2, "vp": 2,
               "pp_schedule": "interleaved_1f1b"}, document_masking=True),
        Layout("docs_cp2_dp2_zero2_full_ckpt_olmo3", "olmo3", {"cp": 2, "dp": 2, "reshard_after_forward": False,
               "activation_checkpointing": "full"}, 2, document_masking=True),
        Layout("docs_cp4_tp2_sp_selective_ckpt_olmo3", "olmo3", {"cp": 4, "tp": 2, "sequence_parallel": True,
               "activation_checkpointing": "selective"}, 2, document_masking=True),
    ]  # fmt: skip


LAYOUTS = _layouts()
FP8_LAYOUTS = [Layout("fp8_tp2_pp2_dp2", "fp8", {"tp": 2, "pp": 2, "dp": 2, "sequence_parallel": True})]


def _spawn_group(layout: Layout) -> tuple[str, int]:
    """The layouts of one world size run in one spawn; the FP8 and the CP ones in their own (each spawn's time
    counts against its first test's timeout)."""
    kind = "fp8" if layout.model == "fp8" else "cp" if layout.parallel.get("cp", 1) > 1 else "fp32"
    return (kind, layout.world_size)


def _spawn_layouts(layouts: list[Layout], out: Path) -> None:
    nprocs = max(layout.world_size for layout in layouts)
    spawn(run_layouts, (nprocs, [dataclasses.asdict(layout) for layout in layouts], str(out)), nprocs)


@pytest.fixture(scope="session")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Layout], Path]:
    """Every layout runs once, those of one world size (FP8 apart) in one spawn when a test first needs
    one of them (so no test waits for them all); the tests below read the results."""
    return spawned_results(tmp_path_factory.mktemp("parallel"), LAYOUTS + FP8_LAYOUTS, _spawn_group, _spawn_layouts)


_references: dict[tuple, dict] = {}


def reference_for(layout: Layout) -> dict:
    key = (layout.model, layout.parallel.get("tp", 1), layout.document_masking)  # the padded vocab depends on tp
    if key not in _references:
        _references[key] = reference(layout)
    return _references[key]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_layout_matches_one_process(layout: Layout, matrix: Callable[[Layout], Path]) -> None:
    directory = matrix(layout)
    errors = sorted(directory.glob("*.error"))
    assert not errors, errors[0].read_text()
    results = [torch.load(directory / f"rank{r}.pt") for r in range(layout.world_size)]
    expected = reference_for(layout)
    for result in results:
        for key in ("ce", "z", "grad_norm"):
            for got, want in zip(result[key], expected[key]):
                assert abs(got - want) <= 1e-5 * abs(want), (key, result[key], expected[key])
        if "eval_nll" in expected:
            assert abs(result["eval_nll"] - expected["eval_nll"]) <= 1e-5 * expected["eval_nll"]
    seen = set()
    for result in results:
        for name, grad in result["grads"].items():
            assert rel(grad, expected["grads"][name]) < 1e-5, name
        for name, param in result["params"].items():
            assert (param - expected["params"][name]).abs().max().item() < 1e-4, name
        seen |= set(result["params"])
    assert seen == set(expected["params"]), "some parameters live on no rank"


@pytest.mark.parametrize("layout", FP8_LAYOUTS, ids=[layout.name for layout in FP8_LAYOUTS])
def test_fp8_layout_matches_fp8_on_one_process(layout: Layout, matrix: Callable[[Layout], Path]) -> None:
    """FP8 tolerance: per-tensor scales come from each rank's TP shard (one process scales the whole
    tensor), so losses agree to 1% rather than to fp32 rounding."""
    directory = matrix(layout)
    errors = sorted(directory.glob("*.error"))
    assert not errors, errors[0].read_text()
    expected = reference_for(layout)
    for rank in range(layout.world_size):
        result = torch.load(directory / f"rank{rank}.pt")
        for got, want in zip(result["ce"], expected["ce"]):
            assert abs(got - want) <= 1e-2 * want, (result["ce"], expected["ce"])
