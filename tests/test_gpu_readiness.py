"""What a GPU run gets right that a CPU run cannot show: checked on CPU with the device faked.

Each test pins one GPU-only correctness rule: the same weights on every device, configurations
a GPU cannot run refused at start-up, and device state (TF32, peak memory) set where it belongs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from typing import ClassVar

import pytest
import torch
from helpers import small_model
from torch import nn

from megaolmo.bench.step import reset_peak_memory
from megaolmo.config import Config, ConfigError, Fp8Config, ParallelConfig, TrainerConfig, resolve, resolve_layout
from megaolmo.data import shifted_labels
from megaolmo.model import build_model
from megaolmo.model.engine import ParallelOLMo
from megaolmo.model.fp8 import apply_fp8, apply_tf32, check_backend
from megaolmo.model.init import full_shape, init_parameters, mitchell_std, parameter_seed
from megaolmo.parallel.pipeline import Schedule


def _recording_generators(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """Patch torch.Generator to record the device of every generator created."""
    devices, real = [], torch.Generator

    def generator(device: str | torch.device = "cpu") -> torch.Generator:
        devices.append(torch.device(device))
        return real(device=device)

    monkeypatch.setattr(torch, "Generator", generator)
    return devices


def test_init_draws_on_the_cpu_whatever_the_parameter_device(monkeypatch: pytest.MonkeyPatch) -> None:
    config = small_model()
    devices = _recording_generators(monkeypatch)
    meta = build_model(config, device="meta")
    init_parameters(meta, config, seed=5)  # a non-CPU device: a generator there would raise
    assert devices and all(device.type == "cpu" for device in devices)


def test_init_is_the_cpu_draw_of_seed_and_name() -> None:
    config = small_model()
    model = build_model(config, device="cpu", seed=5)
    for name, param in model.named_parameters():
        std = mitchell_std(config, name)
        expected = torch.empty(full_shape(config, name))
        generator = torch.Generator().manual_seed(parameter_seed(5, name))
        torch.nn.init.trunc_normal_(expected, std=std, a=-3 * std, b=3 * std, generator=generator)
        torch.testing.assert_close(param, expected, rtol=0, atol=0)


def test_transformer_engine_with_full_recompute_is_refused_at_start_up() -> None:
    model = small_model(linear="te")
    with pytest.raises(ConfigError, match="activation_checkpointing=full with model.linear=te"):
        resolve_layout(model, ParallelConfig(activation_checkpointing="full"), world_size=1)
    resolve_layout(model, ParallelConfig(activation_checkpointing="selective"), world_size=1)  # no TE GEMM inside


def test_flash_attention_in_fp32_is_refused_at_start_up() -> None:
    def config(precision: str) -> Config:
        return Config(model=small_model(attention="flash"), trainer=TrainerConfig(precision=precision))

    with pytest.raises(ConfigError, match="model.attention=flash needs fp16/bf16"):
        resolve(config("fp32"), world_size=1)
    resolve(config("bf16"), world_size=1)


class _StubTeLinear(nn.Linear):
    """Stands in for te.Linear: each forward enters its input's amax into a history, as delayed scaling does."""

    def __init__(self, local: nn.Linear) -> None:
        super().__init__(local.in_features, local.out_features, bias=False)
        self.weight = local.weight
        self.history: list[float] = []
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        self.history.append(x.detach().abs().max().item())
        return super().forward(x)

    def get_extra_state(self) -> list[float]:
        return list(self.history)

    def set_extra_state(self, state: list[float]) -> None:
        self.history = list(state)


_StubTeLinear.__module__ = "transformer_engine.pytorch.module.linear"  # how megaolmo recognizes TE modules


def test_evaluation_leaves_the_fp8_scaling_state_as_it_was() -> None:
    model = ParallelOLMo(small_model(), ParallelConfig())
    block = model.stages[0].blocks["0"]
    block.att_proj.linear = stub = _StubTeLinear(block.att_proj.linear)
    ids = torch.randint(0, 256, (4, 16))
    model.forward_backward(ids, shifted_labels(ids), micro_batch_size=2)
    trained = list(stub.history)
    assert len(trained) == 2  # one amax per training micro-batch
    model.evaluate(ids, shifted_labels(ids), micro_batch_size=2)
    assert stub.forwards == 4  # evaluation ran through the FP8 module...
    assert stub.history == trained  # ...and its scaling state is what training left


@pytest.mark.parametrize(("capability", "refused"), [((9, 0), True), ((10, 0), False)])
def test_mxfp8_below_blackwell_is_refused(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], refused: bool
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: True if name == "transformer_engine" else find_spec(name)
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    cuda = torch.device("cuda", 0)
    check_backend("te", cuda, Fp8Config(te_recipe="current"))
    if refused:
        with pytest.raises(ConfigError, match="fp8.te_recipe=mxfp8 needs a Blackwell GPU"):
            check_backend("te", cuda, Fp8Config(te_recipe="mxfp8"))
    else:
        check_backend("te", cuda, Fp8Config(te_recipe="mxfp8"))


def test_tf32_is_switched_on_cuda_only() -> None:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        apply_tf32(TrainerConfig().tf32, "cpu")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        apply_tf32(TrainerConfig().tf32, "cuda")  # on by default
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        apply_tf32(False, "cuda")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_bench_resets_the_peak_of_the_rank_device(monkeypatch: pytest.MonkeyPatch) -> None:
    reset = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset.append)
    reset_peak_memory(torch.device("cpu"))
    assert reset == []
    reset_peak_memory(torch.device("cuda", 3))
    assert reset == [torch.device("cuda", 3)]


class _OldSchedule:
    """A schedule of a torch before `return_outputs` and `eval`: unknown keywords go to the stage modules."""

    def __init__(self) -> None:
        self._has_backward = True
        self.calls: list[tuple[dict, bool]] = []

    def step(self, *args, target=None, losses=None, **kwargs) -> None:
        self.calls.append((kwargs, self._has_backward))


class _NewSchedule(_OldSchedule):
    """A schedule of torch 2.13: `step(return_outputs=...)` and `eval`."""

    def step(self, *args, target=None, losses=None, return_outputs=True, **kwargs) -> None:
        self.calls.append(({"return_outputs": return_outputs, **kwargs}, self._has_backward))

    def eval(self, *args, target=None, losses=None, **kwargs) -> None:
        self.calls.append(({"eval": True}, False))


def test_schedules_without_return_outputs_or_eval_fall_back() -> None:
    old = Schedule(_OldSchedule())
    old.step(torch.zeros(1), target=None)
    old.eval(torch.zeros(1), target=None)
    assert old.schedule.calls == [({}, True), ({}, False)]  # nothing sent to the model; eval: no backward
    assert old.schedule._has_backward  # training steps still run the backward afterwards
    new = Schedule(_NewSchedule())
    new.step(torch.zeros(1), target=None)
    new.eval(torch.zeros(1), target=None)
    assert new.schedule.calls == [({"return_outputs": False}, True), ({"eval": True}, False)]


class _FakeTeLinear(nn.Linear):
    """te.Linear's calling convention: a forward that takes `is_first_microbatch`, recorded here."""

    calls: ClassVar[list[bool | None]] = []

    def __init__(self, in_features: int, out_features: int, *, bias: bool, params_dtype, device) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=params_dtype, device=device)

    def forward(self, x: torch.Tensor, is_first_microbatch: bool | None = None) -> torch.Tensor:
        _FakeTeLinear.calls.append(is_first_microbatch)
        return super().forward(x)

    def get_extra_state(self) -> None:
        return None

    def set_extra_state(self, state: None) -> None:
        del state


_FakeTeLinear.__module__ = "transformer_engine.pytorch.module.linear"


def _fake_transformer_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Just enough of transformer_engine for apply_fp8 to build TE linears on CPU."""
    pytorch = types.SimpleNamespace(Linear=_FakeTeLinear, fp8_autocast=lambda **kwargs: contextlib.nullcontext())
    formats = types.SimpleNamespace(HYBRID="HYBRID", E4M3="E4M3")
    recipe = types.SimpleNamespace(Format=formats, DelayedScaling=lambda **kwargs: kwargs)
    common = types.SimpleNamespace(recipe=recipe)
    package = types.SimpleNamespace(pytorch=pytorch, common=common)
    for name, module in {"transformer_engine": package, "transformer_engine.pytorch": pytorch,
                         "transformer_engine.common": common, "transformer_engine.common.recipe": recipe}.items():  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)


def test_te_casts_the_weights_once_per_step_and_every_time_in_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_transformer_engine(monkeypatch)
    model = ParallelOLMo(small_model(n_layers=1), ParallelConfig())
    (stage,) = model.stages
    apply_fp8(stage, linear="te", config=Fp8Config(), n_layers=1)
    ids = torch.randint(0, 256, (6, 16))
    for _ in range(2):
        _FakeTeLinear.calls.clear()
        model.forward_backward(ids, shifted_labels(ids), micro_batch_size=2)
        per_linear = len(_FakeTeLinear.calls) // 3
        assert per_linear == 4  # the block's four linears, three micro-batches
        assert _FakeTeLinear.calls == [True] * per_linear + [False] * 2 * per_linear
    _FakeTeLinear.calls.clear()
    model.evaluate(ids, shifted_labels(ids), micro_batch_size=2)
    assert _FakeTeLinear.calls == [None] * 12
