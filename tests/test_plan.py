"""The planner: its memory model against measured peaks, its formulas on hand-checked cases, search and CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from gloo_groups import spawn, spawned_results
from helpers import small_model
from plan_worker import GLOBAL_BATCH, MICRO_BATCH, MODEL, SEQ_LEN, Run, measure_runs, profiled_peak, train_two_steps

from megaolmo.config import ConfigError
from megaolmo.plan import Plan, make_plan
from megaolmo.plan.__main__ import main
from megaolmo.plan.comm import pp_bytes_per_microbatch, tp_bytes_per_microbatch, traffic
from megaolmo.plan.hardware import Hardware
from megaolmo.plan.layout import Layout, Placement, Workload
from megaolmo.plan.memory import block_activation_terms
from megaolmo.plan.search import candidate_layouts, search

TOLERANCE = 0.10
SINGLE = [Run("single_fp32"), Run("single_bf16", bf16=True)]
SPAWNED = [
    Run("tp2_sp", {"tp": 2, "sequence_parallel": True}),
    Run("tp2_selective_recompute", {"tp": 2, "activation_checkpointing": "selective"}, bf16=True),
    Run("pp2_1f1b", {"pp": 2}, bf16=True),
    Run("pp2_vp2_interleaved", {"pp": 2, "vp": 2, "pp_schedule": "interleaved_1f1b"}),
    Run("dp2_fsdp", {"dp": 2}, bf16=True),
    Run("dp2_zero2_full_recompute", {"dp": 2, "reshard_after_forward": False, "activation_checkpointing": "full"},
        bf16=True),
]  # fmt: skip
TEST_HARDWARE = Hardware(
    name="test", device_name="test CPU", device="cpu", devices_per_node=4, nodes=2, peak_flops=1e12, memory_bytes=2**34,
    capacity_bytes=2**34, hbm_bytes_per_s=1e11, intra_node_bytes_per_s=1e10, inter_node_bytes_per_s=1e9,
    matmul_efficiency=0.5,
)  # fmt: skip


# The hand-checked cases: d_model 256, 128 tokens, global batch 16 (the measured runs are smaller).
HAND_MODEL = dataclasses.replace(MODEL, d_model=256, ffn_hidden_size=704)
HAND_WORK = Workload(HAND_MODEL, 128, 16, False, "cpu", "torch", False, False)


def plan_for(run: Run, device: str = "cpu") -> Plan:
    work = Workload(MODEL, SEQ_LEN, GLOBAL_BATCH, run.bf16, device, MODEL.kernels, device == "cuda", False)
    layout = Layout(micro_batch_size=MICRO_BATCH, **run.parallel)
    return make_plan(work, layout, dataclasses.replace(TEST_HARDWARE, device=device))


def check(planned: float, measured: int, what: str) -> None:
    error = planned / measured - 1
    print(f"{what}: measured {measured / 2**20:.2f} MiB, planned {planned / 2**20:.2f} MiB ({error:+.1%})")
    assert abs(error) <= TOLERANCE, (what, planned, measured)


def _spawn_runs(runs: list[Run], out: Path) -> None:
    spawn(measure_runs, ([dataclasses.asdict(run) for run in runs], str(out)), max(run.world_size for run in runs))


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory):
    """Each multi-rank run in its own spawn of two gloo ranks, when its test asks for it."""
    return spawned_results(tmp_path_factory.mktemp("plan"), SPAWNED, lambda run: run.name, _spawn_runs)


@pytest.mark.parametrize("run", SINGLE, ids=[run.name for run in SINGLE])
def test_memory_plan_matches_a_single_process(run: Run) -> None:
    _, peak = profiled_peak(run)
    check(plan_for(run).peak_bytes, peak, run.name)


@pytest.mark.parametrize("run", SPAWNED, ids=[run.name for run in SPAWNED])
def test_memory_plan_matches_every_rank(run: Run, spawned) -> None:
    directory = spawned(run)
    errors = sorted(directory.glob("*.error"))
    assert not errors, errors[0].read_text()
    plan = plan_for(run)
    for rank in range(run.world_size):
        result = json.loads((directory / f"rank{rank}.json").read_text())
        check(plan.memory[result["pp_rank"]].peak.total, result["peak"], f"{run.name} rank {rank}")


@pytest.mark.gpu
@pytest.mark.parametrize("run", SINGLE, ids=[run.name for run in SINGLE])
def test_memory_plan_matches_cuda_peak(run: Run) -> None:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    train_two_steps(run, device="cuda")
    check(plan_for(run, "cuda").peak_bytes, torch.cuda.max_memory_allocated() - before, f"cuda {run.name}")


def test_block_activations_follow_the_code_not_megatrons_34() -> None:
    """bf16, TP2 + SP, Triton kernels (tests/tp_worker.py measures 30.9 s b h / tp for this block): LayerNorm
    outputs 4 and rstd, q k v 6, attention output 2 and logsumexp, its [s, b, h] copy 2, SwiGLU 3F x 2."""
    model = small_model(n_layers=1, ffn_hidden_size=176, kernels="triton")
    work = Workload(model, 32, 4, True, "cpu", "triton", False, False)
    placement = Placement(work, Layout(tp=2, dp=1, micro_batch_size=2, sequence_parallel=True))
    sbh_over_tp = 32 * 2 * 64 / 2
    per_rows = sum(block_activation_terms(placement).values()) / sbh_over_tp
    expected = 4 + 2 * 4 / 64 + 6 + 2 + 4 * 4 / 64 + 2 + 3 * 176 / 64 * 2
    assert per_rows == pytest.approx(expected) and per_rows == pytest.approx(30.875)


def test_pipeline_bubble_and_microbatches_in_flight() -> None:
    model = small_model(n_layers=8)
    work = Workload(model, 32, 16, False, "cpu", "torch", False, False)
    one_f_one_b = Placement(work, Layout(pp=4, dp=2, micro_batch_size=1))  # m = 8
    assert one_f_one_b.bubble_fraction() == pytest.approx(3 / 8)
    assert [one_f_one_b.microbatches_in_flight(r)[0] for r in one_f_one_b.ranks()] == [4, 3, 2, 1]
    interleaved = Placement(work, Layout(pp=4, vp=2, dp=2, micro_batch_size=1, pp_schedule="interleaved_1f1b"))
    assert interleaved.bubble_fraction() == pytest.approx(3 / 16)
    # rank 0: pp x vp x (1 + (pp - 1) / (pp x vp)) = 11 chunks of one layer, Megatron's interleaving factor
    assert interleaved.microbatches_in_flight(interleaved.ranks()[0]) == (11, 16)
    gpipe = Placement(work, Layout(pp=4, dp=2, micro_batch_size=1, pp_schedule="gpipe"))
    assert gpipe.microbatches_in_flight(gpipe.ranks()[0])[0] == 8


def test_communication_volumes_on_hand_checked_cases() -> None:
    """s 128, b 4, h 256 in fp32: one [s, b, h] activation is 512 KiB; TP2 rings send half of it."""
    act = 128 * 4 * 256 * 4
    sp = Placement(HAND_WORK, Layout(tp=2, micro_batch_size=4, sequence_parallel=True))
    (rank,) = sp.ranks()
    loss = 3 * 2 * 0.5 * 512 * 4  # three all-reduces over the 512 tokens' fp32 statistics
    # per layer: forward 2 all-gathers + 2 reduce-scatters, backward those mirrored + 2 re-gathers; embedding
    # reduce-scatter + its all-gather back; tied head all-gather + reduce-scatter back
    assert tp_bytes_per_microbatch(sp, rank) == 4 * 10 * 0.5 * act + 2 * 0.5 * act + 2 * 0.5 * act + loss
    plain = Placement(sp.work, Layout(tp=2, micro_batch_size=4))
    assert tp_bytes_per_microbatch(plain, rank) == 4 * 4 * act + act + act + loss  # 4 all-reduces per layer
    pipeline = Placement(sp.work, Layout(pp=2, micro_batch_size=4))
    assert pp_bytes_per_microbatch(pipeline) == 2 * act  # the activation forward, its gradient back
    dp = Placement(dataclasses.replace(sp.work, bf16=True), Layout(dp=2, micro_batch_size=4))  # m = 2
    flows = {flow.kind: flow for flow in traffic(dp, dp.ranks()[0], TEST_HARDWARE)}
    blocks, root = 4 * dp.block_params, 512 * 256
    # ZeRO-3 gathers every unit, the root too, in forward and backward of each micro-batch (tests/test_zero2.py
    # counts them; the root is resharded after forward because reshard_after_forward=True is passed explicitly)
    assert flows["dp_gather"].bytes_per_step == (2 * 2 * blocks + 2 * 2 * root) * 2 * 0.5
    assert flows["dp_scatter"].bytes_per_step == (blocks + root) * 4 * 0.5  # fp32 gradients, once per step
    assert flows["dp_gather"].bytes_per_second == TEST_HARDWARE.intra_node_bytes_per_s  # 2 ranks in a node


def test_search_returns_only_feasible_layouts_fastest_first() -> None:
    work = dataclasses.replace(HAND_WORK, bf16=True)
    hardware = dataclasses.replace(TEST_HARDWARE, memory_bytes=16 * 2**20)  # about half the layouts fit
    accepted = []
    for layout in candidate_layouts(work, hardware):
        try:
            accepted.append(make_plan(work, layout, hardware))
        except ConfigError:
            continue
    plans = search(work, hardware)
    assert plans and all(plan.fits for plan in plans)
    assert len(plans) == sum(plan.fits for plan in accepted) < len(accepted)
    times = [float(f"{plan.step.seconds:.3g}") for plan in plans]
    assert times == sorted(times)
    for plan in plans:
        assert plan.layout.tp <= hardware.devices_per_node and plan.layout.world_size == hardware.world_size


def test_cli_prints_the_65b_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment=olmo_65b"]) == 0
    out = capsys.readouterr().out
    assert "layout: tp8 (SP) x pp4 (interleaved_1f1b, vp2) x dp16" in out
    for part in ("peak", "fits", "pipeline bubble", "TP (per sublayer", "DP reduce-scatter", "MFU", "assumptions"):
        assert part in out, part


def test_cli_search_ranks_layouts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment=olmo_1b", "--search", "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "feasible layouts of" in lines[1] and lines[2].split()[:3] == ["#", "tp", "sp"]
    assert [line.split()[0] for line in lines[4:]] == ["1", "2", "3"]


def test_cli_rejects_a_layout_that_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment=olmo_65b", "parallel=fsdp"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("error: layout tp1 x pp1 x dp512, micro-batch 1") and "over the" in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["experiment=olmo_65b", "parallel.tp=3"], "error: the cluster has 512 GPUs"),
        (["experiment=olmo_65b", "parallel.pp=3", "parallel.vp=1", "parallel.pp_schedule=1f1b", "cluster.nodes=48"],
         "error: model.n_layers=80 does not divide into 3 pipeline stages"),
        (["no_such_key=1"], "error: Could not override 'no_such_key'"),
        (["cluster.hbm_gbps=null", "cluster=h100_8x"], "error: cluster 'h100_8x' does not set cluster.hbm_gbps"),
    ],
)  # fmt: skip
def test_cli_bad_config_is_one_line_and_exit_2(
    overrides: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(overrides) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(message), err


def test_placement_refuses_what_megaolmo_refuses() -> None:
    work = HAND_WORK
    with pytest.raises(ConfigError, match="not divisible by trainer.micro_batch_size=4 x dp=8"):
        Placement(dataclasses.replace(work, global_batch_size=12), Layout(dp=8, micro_batch_size=4))
    with pytest.raises(ConfigError, match="cannot fill 4 pipeline stages"):
        Placement(work, Layout(pp=4, micro_batch_size=8))
