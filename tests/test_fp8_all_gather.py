"""`fp8.all_gather`: FSDP2 gathers torchao's FP8 block weights as float8 bytes, half bf16's, on CPU (gloo) too.

With fp32 parameters the FP8 all-gather is bitwise the gathered-then-cast path (the same amax, scale and
float8 bytes, cast from the fp32 shards before the gather instead of after it); with bf16 parameters the
gathered path casts a bf16 copy, so the two differ by a bf16 rounding before the float8 one and stay
within test_fp8's FP8 tolerance of each other.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from fp8_worker import MODELS, Run, run_layouts
from gloo_groups import spawn
from omegaconf import OmegaConf

from megaolmo.config import Config, ConfigError, Fp8Config, ParallelConfig, resolve, resolve_layout
from megaolmo.model.engine import ParallelOLMo
from megaolmo.model.fp8 import apply_fp8
from megaolmo.model.init import init_parameters
from megaolmo.model.olmo import OLMo
from megaolmo.train import loop

RUNS = [
    Run(f"{name}_{mode}", model, mode == "fp8", dtype, parallel)
    for name, model, dtype, parallel in [
        # OLMo-1: units of float8 weights alone; dp3 leaves attn_out's 64 rows uneven (padded shards)
        ("dp3_fp32", "olmo1", "fp32", {"dp": 3}),
        ("tp2_pp2_dp2", "olmo2", "bf16", {"tp": 2, "pp": 2, "dp": 2}),  # OLMo-2: float8 beside bf16 norm weights
    ]
    for mode in ("gathered", "fp8")
]
FP8_LOSS = 0.02  # test_fp8: torchao's FP8 loss within 2% of the high-precision one


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict]]:
    out = tmp_path_factory.mktemp("fp8_all_gather")
    spawn(run_layouts, (8, [dataclasses.asdict(run) for run in RUNS], str(out)), 8)
    found = {}
    for run in RUNS:
        errors = sorted((out / run.name).glob("rank*.error"))
        if errors:
            pytest.fail(errors[0].read_text())
        found[run.name] = (
            json.loads((out / run.name / "rank0.json").read_text()),
            torch.load(out / run.name / "rank0.pt"),
        )
    return found


def block_linears(stages: int, blocks_per_stage: int) -> list[str]:
    return [f"{stage}.blocks.{stage * blocks_per_stage + block}.{name}.linear.weight" for stage in range(stages)
            for block in range(blocks_per_stage)
            for name in ("att_proj", "attn_out", "ff_proj", "ff_out")]  # fmt: skip


def test_fp32_params_gather_bitwise_the_same_fp8_in_a_quarter_of_the_bytes_even_on_uneven_shards(results) -> None:
    (gathered, gathered_weights), (fp8, fp8_weights) = results["dp3_fp32_gathered"], results["dp3_fp32_fp8"]
    assert fp8["fp8_weights"] == block_linears(1, 2) and gathered["fp8_weights"] == []
    assert fp8["ce"] == gathered["ce"] and fp8["grad_norm"] == gathered["grad_norm"]
    assert all(torch.equal(fp8_weights[name], gathered_weights[name]) for name in gathered_weights)
    assert all(fp8["scales_match"]) and fp8["plain"] and fp8["finite"]
    # The first step's all-gathers scale each weight themselves; after it, they use the precomputed scales.
    assert fp8["dynamic_casts"][0] > 0 and fp8["dynamic_casts"][1:] == [0, 0]
    for step_fp8, step_gathered in zip(fp8["bytes"], gathered["bytes"], strict=True):
        for (sent, dtype), (sent_fp32, dtype_fp32) in zip(step_fp8, step_gathered, strict=True):
            assert dtype_fp32 == "torch.float32"
            # OLMo-1's blocks hold FP8 linears only: 1 byte an element instead of 4; the root's unit is unchanged.
            assert (sent, dtype) == ((sent_fp32 // 4, "torch.uint8") if dtype == "torch.uint8" else (sent_fp32, dtype))


def test_bf16_fp8_all_gather_tracks_the_gathered_path_on_tp2_pp2_dp2_in_half_the_block_bytes(results) -> None:
    (gathered, _), (fp8, _) = results["tp2_pp2_dp2_gathered"], results["tp2_pp2_dp2_fp8"]
    assert fp8["fp8_weights"] == block_linears(1, 1)  # rank 0: pipeline stage 0 of 2, TP and DP shards
    for a, b in zip(gathered["ce"], fp8["ce"], strict=True):
        assert abs(a - b) <= FP8_LOSS * a, (gathered["ce"], fp8["ce"])
    assert all(fp8["scales_match"]) and fp8["plain"] and fp8["finite"] and fp8["dynamic_casts"][1:] == [0, 0]
    block_bf16 = block_fp8 = 0
    for step_fp8, step_gathered in zip(fp8["bytes"], gathered["bytes"], strict=True):
        for (sent, dtype), (sent_bf16, _) in zip(step_fp8, step_gathered, strict=True):
            if dtype == "torch.uint8":  # a block: its float8 weights and its bf16 norm weights
                block_fp8, block_bf16 = block_fp8 + sent, block_bf16 + sent_bf16
            else:
                assert sent == sent_bf16
    assert 0.5 < block_fp8 / block_bf16 < 0.51, (block_fp8, block_bf16)


def test_all_gather_is_refused_where_it_cannot_apply() -> None:
    with pytest.raises(ConfigError, match="^fp8.all_gather=true needs fp8.torchao_recipe=tensorwise, not rowwise"):
        Fp8Config(all_gather=True, torchao_recipe="rowwise")
    fp8 = Fp8Config(all_gather=True)
    with pytest.raises(ConfigError, match="^fp8.all_gather=true needs data parallelism"):
        ParallelOLMo(MODELS["olmo1"], ParallelConfig(device="cpu"), fp8=fp8)
    config = Config(model=dataclasses.replace(MODELS["olmo1"], linear="torch"), fp8=fp8)
    with pytest.raises(ConfigError, match="^fp8.all_gather=true all-gathers torchao's FP8 weights, not model.linear"):
        resolve(config, world_size=2)
    config.model = MODELS["olmo1"]
    with pytest.raises(ConfigError, match="needs data parallelism"):
        resolve(config, world_size=1)
    parsed = OmegaConf.merge(OmegaConf.structured(Fp8Config), OmegaConf.from_dotlist(["all_gather=true"]))
    assert OmegaConf.to_object(parsed).all_gather is True and Fp8Config().all_gather is False


@pytest.mark.parametrize("finite", [True, False])
def test_the_loop_precomputes_the_scales_after_each_applied_step(monkeypatch, finite: bool) -> None:
    events: list[str] = []

    def forward_backward(*args) -> SimpleNamespace:
        events.append("backward")
        return SimpleNamespace(ce=1.0 if finite else float("nan"))

    model = SimpleNamespace(stages=["stage"], mesh=SimpleNamespace(device=torch.device("cpu")),
                            forward_backward=forward_backward, clip_grad_norm_=lambda max_norm: 1.0)  # fmt: skip
    optimizer = SimpleNamespace(param_groups=[{}], zero_grad=lambda set_to_none: None,
                                step=lambda: events.append("step"))  # fmt: skip
    config = Config(fp8=Fp8Config(all_gather=True))
    config.trainer.nonfinite = "skip"  # a non-finite step is skipped: no new weights, no new scales
    monkeypatch.setattr(loop, "precompute_fp8_scales", lambda stages, fp8: events.append(f"scales {stages}"))
    loop.train_step(model, optimizer, SimpleNamespace(input_ids=None, labels=lambda: None), config=config, step=0)
    assert events == (["backward", "step", "scales ['stage']"] if finite else ["backward"])


def test_a_float8_weight_saves_as_its_plain_tensor_and_rebuilds_as_itself(tmp_path) -> None:
    layout = resolve_layout(MODELS["olmo1"], ParallelConfig(device="cpu"), 1)
    stage = OLMo(layout.model)
    init_parameters(stage, layout.model, seed=0)
    apply_fp8(stage, linear="torchao", config=Fp8Config(all_gather=True), n_layers=2, emulate=True)
    weight = stage.blocks["0"].ff_out.linear.weight
    assert type(weight).__name__ == "Float8AllGatherWeight" and type(weight.detach()) is type(weight)
    torch.save({"w": weight.detach()}, tmp_path / "w.pt")
    saved = torch.load(tmp_path / "w.pt", weights_only=True)["w"]  # no torchao class needed to read it
    assert type(saved) is torch.Tensor and torch.equal(saved, weight._tensor)
    weight._precomputed_scale = torch.tensor(3.0)
    names, spec = weight.__tensor_flatten__()
    rebuilt = type(weight).__tensor_unflatten__({name: getattr(weight, name) for name in names}, spec, None, None)
    assert type(rebuilt) is type(weight) and rebuilt._precomputed_scale == 3.0  # as torch.compile rebuilds it
