"""The planner: its memory model against measured peaks, its formulas on hand-checked cases, search and CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import plan_worker
import pytest
import torch
from gloo_groups import spawn, spawned_results
from helpers import small_model
from plan_worker import GLOBAL_BATCH, MICRO_BATCH, MODEL, SEQ_LEN, Run, measure_runs, profiled_peak, train_two_steps

from megaolmo import ModelConfig, build_model
from megaolmo.config import ConfigError
from megaolmo.model.flops import attended_pairs, attention_fraction, flops_per_token
from megaolmo.model.olmo import OLMoBlock
from megaolmo.model.rope import rope_tables
from megaolmo.plan import Plan, make_plan
from megaolmo.plan.__main__ import _setup, compose_config, main
from megaolmo.plan.comm import cp_bytes_per_microbatch, pp_bytes_per_microbatch, tp_bytes_per_microbatch, traffic
from megaolmo.plan.hardware import Hardware
from megaolmo.plan.layout import Layout, Placement, Workload
from megaolmo.plan.memory import block_activation_terms, head_activation_bytes, logits_bytes, plan_memory
from megaolmo.plan.search import candidate_layouts, search
from megaolmo.plan.timing import attention_forward, cp_ring_seconds, microbatch_time, ring_step_forwards

TOLERANCE = 0.10
SINGLE = [
    Run("single_fp32"),
    Run("single_bf16", bf16=True),
    Run("single_bf16_chunked_loss", bf16=True, loss_chunk_tokens=64),  # 4 chunks of a micro-batch's 256 tokens
]
SPAWNED = [
    Run("tp2_sp", {"tp": 2, "sequence_parallel": True}),
    Run("tp2_selective_recompute", {"tp": 2, "activation_checkpointing": "selective"}, bf16=True),
    Run("pp2_1f1b", {"pp": 2}, bf16=True),
    Run("pp2_vp2_interleaved", {"pp": 2, "vp": 2, "pp_schedule": "interleaved_1f1b"}),
    Run("dp2_fsdp", {"dp": 2}, bf16=True),
    Run("dp2_zero2_full_recompute", {"dp": 2, "reshard_after_forward": False, "activation_checkpointing": "full"},
        bf16=True),
    # Context parallelism: each rank holds 128 / cp tokens of every row, FSDP2 shards over the cp ranks.
    Run("cp2", {"cp": 2}),
    Run("cp4", {"cp": 4}),
    Run("cp2_document_masking", {"cp": 2}, document_masking=True),
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
    work = Workload(
        MODEL, SEQ_LEN, GLOBAL_BATCH, run.bf16, device, MODEL.kernels, device == "cuda", False, run.loss_chunk_tokens,
        document_masking=run.document_masking,
    )  # fmt: skip
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
    """bf16, TP2 + SP, Triton kernels, on CUDA: LayerNorm outputs 4 and rstd, q k v 6, attention output 2 and
    logsumexp, its [s, b, h] copy 2, SwiGLU 3F x 2. On CPU SDPA writes the output in the [s, b, heads, hd]
    order attn_out reads, which keeps a view of it, not a copy (tests/tp_worker.py measures the CPU block)."""
    model = small_model(n_layers=1, ffn_hidden_size=176, kernels="triton")
    sbh_over_tp = 32 * 2 * 64 / 2
    expected = 4 + 2 * 4 / 64 + 6 + 2 + 4 * 4 / 64 + 2 + 3 * 176 / 64 * 2
    for device, output_copy in (("cuda", 2), ("cpu", 0)):
        work = Workload(model, 32, 4, True, device, "triton", False, False)
        placement = Placement(work, Layout(tp=2, dp=1, micro_batch_size=2, sequence_parallel=True))
        per_rows = sum(block_activation_terms(placement).values()) / sbh_over_tp
        assert per_rows == pytest.approx(expected - 2 + output_copy), device
    assert expected == pytest.approx(30.875)


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
    fp8 = Placement(dataclasses.replace(dp.work, fp8_all_gather=True), dp.layout)
    flows = {flow.kind: flow for flow in traffic(fp8, fp8.ranks()[0], TEST_HARDWARE)}
    linears = 4 * fp8.block_linear_params  # OLMo-1's blocks are all linears: one byte each, the root stays bf16
    assert linears == blocks and flows["dp_gather"].bytes_per_step == (2 * 2 * linears * 1 + 2 * 2 * root * 2) * 0.5


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


# OLMo-2 and OLMo-3: the measured model's shapes with the newer blocks (a window shorter than the sequence).
NEW_ARCHS = {"olmo2": {"arch": "olmo2"}, "olmo3": {"arch": "olmo3", "sliding_window": 32}}
NEW_PRESETS = ["olmo2_1b", "olmo2_7b", "olmo2_13b", "olmo2_32b", "olmo3_7b", "olmo3_32b"]


def test_memory_plan_matches_a_single_process_of_olmo3(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measured single process (fp32) with OLMo-3's block: post-sublayer RMSNorms and their weights, QK-norm,
    ln_f's weight, and sliding windows on three of the four blocks."""
    model = dataclasses.replace(MODEL, **NEW_ARCHS["olmo3"])
    monkeypatch.setattr(plan_worker, "MODEL", model)  # train_two_steps builds plan_worker.MODEL
    run = SINGLE[0]
    _, peak = profiled_peak(run)
    work = Workload(model, SEQ_LEN, GLOBAL_BATCH, run.bf16, "cpu", model.kernels, False, False)
    check(make_plan(work, Layout(micro_batch_size=MICRO_BATCH), TEST_HARDWARE).peak_bytes, peak, f"olmo3 {run.name}")


def saved_block_bytes(config: ModelConfig, layer: int, dtype: torch.dtype, seq_len: int, batch: int) -> int:
    """Bytes autograd keeps for one block's forward on one process (parameters and RoPE tables left out)."""
    with torch.device("meta"):
        block = OLMoBlock(config, layer)
    block.to_empty(device="cpu").to(dtype)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.05)
    cos, sin = rope_tables(seq_len, config.head_dim, config.rope_theta, torch.device("cpu"))
    not_activations = {t.untyped_storage().data_ptr() for t in [*block.parameters(), cos, sin]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in not_activations:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x = torch.randn(seq_len, batch, config.d_model, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x)
    return sum(storages.values())


@pytest.mark.parametrize(
    ("arch", "kernels", "bf16"),
    [("olmo2", "torch", False), ("olmo2", "torch", True), ("olmo3", "torch", False), ("olmo3", "torch", True),
     ("olmo3", "triton", True)],  # the Triton interpreter takes seconds a block: the GPU's case only
    ids=["olmo2-torch-fp32", "olmo2-torch-bf16", "olmo3-torch-fp32", "olmo3-torch-bf16", "olmo3-triton-bf16"],
)  # fmt: skip
def test_block_activations_of_the_newer_blocks_follow_the_code(arch: str, kernels: str, bf16: bool) -> None:
    """What autograd keeps in an OLMo-2/3 block: the residual stream for att_proj and ff_proj, the RMSNorms'
    inputs, QK-norm's (views that hold qkv with the kernel or in fp32), OLMo-3's window mask as an SDPA bias on
    its sliding blocks; averaged over a sliding block and a full one. Within 2% (a few KiB of small tensors
    the planner leaves out, as for OLMo-1)."""
    s, b = 64, 2
    config = small_model(n_layers=2, d_model=128, ffn_hidden_size=352, kernels=kernels, max_sequence_length=s)
    config = dataclasses.replace(config, **NEW_ARCHS[arch])
    if arch == "olmo3":
        config = dataclasses.replace(config, layer_types=["sliding_attention", "full_attention"])
    dtype = torch.bfloat16 if bf16 else torch.float32
    measured = sum(saved_block_bytes(config, i, dtype, s, b) for i in range(2)) / 2
    placement = Placement(Workload(config, s, 8, bf16, "cpu", kernels, False, False), Layout(micro_batch_size=b))
    terms = block_activation_terms(placement)
    planned = sum(terms.values())
    assert abs(planned / measured - 1) < 0.02, (measured, terms)
    assert any(key.startswith("QK-norm") for key in terms)
    assert any(key.startswith("window mask") for key in terms) == (arch == "olmo3")


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_planned_parameters_of_the_new_presets_equal_the_built_model(name: str) -> None:
    """The planner's parameters (its block shapes with the norm weights, ln_f, embedding and head) on one rank,
    and summed over TP ranks, equal num_params and the model built on meta."""
    config = ModelConfig.preset(name)
    built = sum(p.numel() for p in build_model(config, device="meta").parameters())
    work = Workload(config, 4096, 64, True, "cuda", "triton", True, False)
    one = Placement(work, Layout(dp=1, micro_batch_size=1))
    assert one.unsharded_params(one.ranks()[0]) == config.num_params() == built
    tp = Placement(work, Layout(tp=8, dp=1, micro_batch_size=1))
    hd = config.head_dim
    assert tp.block_param_shapes()[-2:] == [(config.n_heads * hd // 8, 1), (config.kv_heads * hd // 8, 1)]
    replicated = 2 * config.d_model * config.n_layers + config.d_model  # attn_norm, ff_norm, ln_f: on every rank
    assert 8 * tp.unsharded_params(tp.ranks()[0]) - 7 * replicated == built  # the rest is split 8 ways


def test_sliding_window_attention_flops() -> None:
    """OLMo-3's sliding blocks count the keys their queries see: fewer FLOPs than OLMo-2 at the same shapes once
    the sequence outgrows the window, the same when the window covers it; OLMo-1 and OLMo-2 keep 12 d s."""
    assert attended_pairs(8, 3) == 1 + 2 + 3 * 6 and attended_pairs(8) == attended_pairs(8, 8) == 36
    assert attention_fraction(8192, 4096) == pytest.approx((4096 * 4097 / 2 + 4096 * 4096) / (8192 * 8193 / 2))
    olmo2 = ModelConfig.preset("olmo2_7b", max_sequence_length=8192)
    olmo3 = ModelConfig.preset("olmo3_7b")
    assert olmo3.num_params() == olmo2.num_params()
    for seq_len in (2048, 4096):  # the window covers the sequence: every block is full causal attention
        assert flops_per_token(olmo3, seq_len) == flops_per_token(olmo2, seq_len)
    attention = 12 * olmo2.d_model * 8192  # one full block's attention term per token
    saved = 24 * attention * (1 - attention_fraction(8192, 4096))  # 24 sliding blocks of 32
    assert flops_per_token(olmo3, 8192) == pytest.approx(flops_per_token(olmo2, 8192) - saved)
    assert flops_per_token(olmo3, 8192) < flops_per_token(olmo2, 8192)
    seven = ModelConfig.preset("olmo_7b")
    assert flops_per_token(seven, 2048) == 6 * seven.num_params(include_embedding=False) + 12 * 32 * 4096 * 2048
    # The roofline: flash-attn computes the band only; SDPA's mask makes it compute every pair.
    hardware = dataclasses.replace(TEST_HARDWARE, device="cuda", peak_flops=1e15, hbm_bytes_per_s=3e12)
    flash = Placement(Workload(dataclasses.replace(olmo3, attention="flash"), 8192, 8, True, "cuda", "triton",
                               True, False), Layout(dp=8, micro_batch_size=1))  # fmt: skip
    full = attention_forward(flash, hardware)
    assert attention_forward(flash, hardware, 4096) == pytest.approx(full * attention_fraction(8192, 4096))
    assert attention_forward(flash, hardware, 8192) == full
    sdpa = Placement(dataclasses.replace(flash.work, model=olmo3), flash.layout)
    assert attention_forward(sdpa, hardware, 4096) > 1.9 * full


def test_qk_norm_all_reduces_and_sp_norm_weights() -> None:
    """OLMo-2 under TP2 + SP sends OLMo-1's collectives plus, per block, QK-norm's four all-reduces of [s, b, 1]
    fp32 (q and k, forward and backward) and the all-reduces of attn_norm's and ff_norm's weight gradients
    (ln_f's too on the last stage); without TP, none."""
    olmo2 = dataclasses.replace(HAND_MODEL, arch="olmo2")
    layout = Layout(tp=2, micro_batch_size=4, sequence_parallel=True)
    old, new = (Placement(dataclasses.replace(HAND_WORK, model=m), layout) for m in (HAND_MODEL, olmo2))
    (rank,) = new.ranks()
    tokens, layers, h = 128 * 4, HAND_MODEL.n_layers, HAND_MODEL.d_model
    qk_norm = layers * 4 * 2 * 0.5 * tokens * 4
    norm_weights = (2 * layers + 1) * 2 * 0.5 * h * 4  # fp32 here
    assert tp_bytes_per_microbatch(new, rank) == tp_bytes_per_microbatch(old, rank) + qk_norm + norm_weights
    full = Placement(new.work, dataclasses.replace(layout, activation_checkpointing="full"))
    full_old = Placement(old.work, full.layout)
    extra = tp_bytes_per_microbatch(full, rank) - tp_bytes_per_microbatch(full_old, rank)
    assert extra == pytest.approx(qk_norm * 6 / 4 + norm_weights)  # recompute repeats the forward's two
    assert tp_bytes_per_microbatch(Placement(new.work, Layout(dp=2, micro_batch_size=4)), rank) == 0


@pytest.mark.parametrize(
    "experiment", ["olmo2_1b", "olmo2_7b", "olmo2_13b", "olmo2_32b", "olmo3_7b", "olmo3_7b_long_context"]
)
def test_cli_plans_the_new_recipes(experiment: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every OLMo-2/3 recipe's layout fits with 10% of the usable memory to spare, as its comment says."""
    assert main([f"experiment={experiment}"]) == 0
    out = capsys.readouterr().out
    assert "QK-norm" in out and "att_proj, ff_proj inputs (the residual stream)" in out
    peak = next(line for line in out.splitlines() if line.strip().startswith("peak ")).split()
    assert peak[2] == peak[5] == "GiB" and float(peak[1]) <= 0.9 * float(peak[4]), peak  # peak X GiB of Y GiB usable


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "slurm").glob("olmo*.sh")))
def test_each_slurm_recipe_asks_for_the_gpus_its_experiment_plans(script: str) -> None:
    """A slurm/olmo*.sh script's nodes and GPUs per node are the ones its experiment's plan lays out."""
    text = (REPO / "slurm" / script).read_text()
    options = [line[len("#SBATCH --") :].partition("=") for line in text.splitlines() if line.startswith("#SBATCH --")]
    sbatch = {key: value for key, _, value in options}
    experiment = text.split('slurm/train.sh" experiment=', 1)[1].split()[0]
    config = compose_config([f"experiment={experiment}"])
    assert int(sbatch["nodes"]) == config.cluster.nodes, (script, experiment)
    assert int(sbatch["gpus-per-node"]) == int(sbatch["ntasks-per-node"]) == config.cluster.gpus_per_node


# Context parallelism: the hand-checked case's 128 tokens over cp ranks, fp32.
CP_WORK = HAND_WORK  # d_model 256, 4 heads of 64 (no GQA), 4 blocks, global batch 16


def test_context_parallel_ring_traffic_on_a_hand_checked_case() -> None:
    """cp2, b 4: each rank's k, v buffer [2, 4, 4 heads, 64 tokens, 64] is 131072 fp32 elements, 512 KiB. Per block
    forward sends it once (cp - 1), backward once more plus the fp32 dk, dv accumulator twice (cp): 4 x 512 KiB;
    full recompute adds the forward's. The ring of tp2 x cp2 fits a node of 4, tp2 x cp4 does not."""
    kv = 2 * 4 * 4 * 64 * 64 * 4
    placement = Placement(CP_WORK, Layout(cp=2, micro_batch_size=4))  # world 2, dp 1, m = 4
    (rank,) = placement.ranks()
    assert placement.local_seq_len == 64 and placement.n_microbatches == 4
    assert cp_bytes_per_microbatch(placement, rank) == 4 * (kv + kv + 2 * kv)
    full = Placement(CP_WORK, Layout(cp=2, micro_batch_size=4, activation_checkpointing="full"))
    assert cp_bytes_per_microbatch(full, rank) == 4 * (kv + kv + 2 * kv + kv)
    flows = {flow.kind: flow for flow in traffic(placement, rank, TEST_HARDWARE)}
    assert flows["cp"].bytes_per_step == 4 * 4 * 4 * kv and flows["cp"].bytes_per_second == 1e10
    # cp4 at b 4: 32 tokens a rank; forward 3 sends, backward 3 + 4 fp32 accumulators, of a buffer half as large
    four = Placement(CP_WORK, Layout(cp=4, micro_batch_size=4))
    assert cp_bytes_per_microbatch(four, rank) == 4 * (3 + 3 + 4) * kv / 2
    wide = Placement(CP_WORK, Layout(tp=2, cp=4, micro_batch_size=4, dp=1))  # 8 ranks: the ring spans 2 nodes of 4
    flows = {flow.kind: flow for flow in traffic(wide, wide.ranks()[0], TEST_HARDWARE)}
    assert flows["cp"].bytes_per_second == TEST_HARDWARE.inter_node_bytes_per_s
    assert cp_bytes_per_microbatch(wide, rank) == cp_bytes_per_microbatch(four, rank) / 2  # kv heads / tp
    # FSDP shards and reduces over dp x cp = 2 x 2 ranks: the fp32 gradients' reduce-scatter sends 3/4 of them
    sharded = Placement(CP_WORK, Layout(cp=2, dp=2, micro_batch_size=4))
    flows = {flow.kind: flow for flow in traffic(sharded, sharded.ranks()[0], TEST_HARDWARE)}
    assert flows["dp_scatter"].bytes_per_step == 4 * sharded.unsharded_params(sharded.ranks()[0]) * 3 / 4
    assert flows["dp_scatter"].group == "2 x 2 (dp x cp) GPUs"


def test_context_parallel_ring_time_is_what_the_attention_blocks_do_not_hide() -> None:
    """With a link fast enough to hide every transfer under its step's block, only the accumulator's last hop
    home is exposed; with a slow one, each step's transfer beyond its block."""
    placement = Placement(CP_WORK, Layout(cp=2, micro_batch_size=4))
    kv_bytes = 2 * 4 * 4 * 64 * 64 * 4
    fast = dataclasses.replace(TEST_HARDWARE, intra_node_bytes_per_s=1e15)
    exposed, hidden = cp_ring_seconds(placement, fast)
    assert exposed == pytest.approx(kv_bytes / 1e15) and hidden == pytest.approx(3 * kv_bytes / 1e15)
    steps = ring_step_forwards(placement, TEST_HARDWARE)  # rank 1 (chunks 1, 2) does the most: 3 pairs
    assert len(steps) == 2 and sum(steps) == pytest.approx(attention_forward(placement, TEST_HARDWARE))
    slow = dataclasses.replace(TEST_HARDWARE, intra_node_bytes_per_s=1e6)
    kv = kv_bytes / 1e6
    exposed, hidden = cp_ring_seconds(placement, slow)
    expected = (kv - steps[0]) + (kv - 2.5 * steps[0]) + (kv - 2.5 * steps[1]) + kv  # fwd, bwd steps 0 1, home
    assert exposed == pytest.approx(expected)
    micro = microbatch_time(placement, placement.ranks()[0], slow)
    assert micro.cp == pytest.approx(4 * exposed) and micro.total == pytest.approx(micro.compute + micro.cp)
    # causal attention without a mask (compute-bound here): the busiest rank's pairs are 1/cp of the causal work
    one = Placement(CP_WORK, Layout(micro_batch_size=4))
    hbm = dataclasses.replace(TEST_HARDWARE, hbm_bytes_per_s=1e15)
    rate = hbm.peak_flops * hbm.matmul_efficiency
    assert attention_forward(placement, hbm) == pytest.approx(2 * 4 * 128 * 128 * 256 / 2 / rate)
    assert attention_forward(one, hbm) == pytest.approx(2 * attention_forward(placement, hbm))


def test_context_parallel_memory_divides_by_cp() -> None:
    """cp2 at 128 tokens keeps per block what one rank keeps at 64 tokens, its logits and loss those of 64 tokens,
    and FSDP2 shards over dp x cp: cp2 x dp2 holds what dp4 holds. No mask is kept under CP: one process with
    document masking keeps a [b, s, s] bias per block."""
    half = Placement(dataclasses.replace(CP_WORK, seq_len=64), Layout(micro_batch_size=4))
    cp2 = Placement(CP_WORK, Layout(cp=2, micro_batch_size=4))
    assert block_activation_terms(cp2) == block_activation_terms(half)
    assert logits_bytes(cp2) == logits_bytes(half) and head_activation_bytes(cp2) == head_activation_bytes(half)
    dp4 = Placement(CP_WORK, Layout(dp=4, micro_batch_size=4))
    cp2_dp2 = Placement(CP_WORK, Layout(cp=2, dp=2, micro_batch_size=4))
    assert cp2_dp2.layout.world_size == 4 and cp2_dp2.n_microbatches == dp4.n_microbatches * 2
    assert cp2_dp2.sharded_params(cp2_dp2.ranks()[0]) == dp4.sharded_params(dp4.ranks()[0])
    step = {m.name: m for m in plan_memory(cp2_dp2)[0].moments}["optimizer step"].items
    assert "weights (fp32 master, FSDP2-sharded 1/4 over dp x cp = 2 x 2)" in step
    documents = dataclasses.replace(CP_WORK, document_masking=True)
    one = block_activation_terms(Placement(documents, Layout(micro_batch_size=4)))
    assert one["document mask as a [b, s, s] SDPA bias"] == 4 * 128 * 128 * 4
    assert block_activation_terms(Placement(documents, Layout(cp=2, micro_batch_size=4))) == block_activation_terms(
        half
    )


def test_placement_refuses_what_megaolmo_refuses_under_context_parallelism() -> None:
    with pytest.raises(ConfigError, match="not divisible by 2 x parallel.cp=3"):
        Placement(dataclasses.replace(CP_WORK, global_batch_size=12), Layout(cp=3, micro_batch_size=4))
    with pytest.raises(ConfigError, match="set model.attention=sdpa"):
        flash = dataclasses.replace(CP_WORK, model=dataclasses.replace(HAND_MODEL, attention="flash"))
        Placement(flash, Layout(cp=2, micro_batch_size=4))
    with pytest.raises(ConfigError, match="are not divisible by parallel.tp=4"):
        Placement(dataclasses.replace(CP_WORK, seq_len=132), Layout(tp=4, cp=2, micro_batch_size=4,
                                                                     sequence_parallel=True))  # fmt: skip


@pytest.fixture(scope="module")
def long_context():
    """The long-context recipe's workload on its 64 H200s, searched at 65536 tokens and at 4096."""
    _, work, hardware = _setup(["experiment=olmo3_7b_long_context"])
    return work, hardware


def test_search_proposes_context_parallelism_for_long_sequences(long_context) -> None:
    """At 65536 tokens the fastest layouts split the sequence (the recipe's cp8 first); at 4096 tokens none of
    the fastest causal layouts does: activations fit without it, and the ring would only add its transfers."""
    work, hardware = long_context
    plans = search(work, hardware)
    assert plans[0].layout.cp > 1 and all(plan.layout.cp > 1 for plan in plans[:10])
    assert plans[0].layout == Layout.from_config(compose_config(["experiment=olmo3_7b_long_context"]), 64)
    no_cp = [plan for plan in plans if plan.layout.cp == 1]
    assert all(plan.step.seconds > plans[0].step.seconds for plan in no_cp)
    causal = search(dataclasses.replace(work, seq_len=4096, document_masking=False), hardware)
    assert causal[0].layout.cp == 1, causal[0].layout.describe()
    # With documents, one process's SDPA computes every (query, key) pair under the [b, 1, s, s] mask while the
    # ring skips the pairs causality masks whole: cp2 comes out about 1% ahead, within the roofline's noise.
    masked = search(dataclasses.replace(work, seq_len=4096), hardware)
    best_without = next(plan for plan in masked if plan.layout.cp == 1)
    assert best_without.step.seconds <= 1.02 * masked[0].step.seconds


def test_cli_prints_the_ring_of_the_long_context_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment=olmo3_7b_long_context"]) == 0
    out = capsys.readouterr().out
    assert "layout: tp1 x cp8 x pp1 x dp8" in out and "the ring spans 8 consecutive ranks (within a node)" in out
    assert "CP ring (k, v forward; k, v + fp32 dk, dv backward)" in out and "ms exposed" in out
    assert "FSDP2-sharded 1/64 over dp x cp = 8 x 8" in out and "document mask as a" not in out
