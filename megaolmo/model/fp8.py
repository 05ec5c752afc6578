"""FP8 as a choice of local GEMM (`model.linear: torch | te | torchao`), under unchanged TP communication.

A TP layer is communication around `layer.linear`; FP8 swaps that local module:
torchao's `Float8Linear` (dynamic scaling, tensorwise or rowwise) or Transformer Engine's `te.pytorch.Linear`
(delayed or current scaling, MXFP8 on Blackwell) whose forward runs inside
`te.fp8_autocast` with the amax reduced over the TP and DP ranks of the stage,
as in Megatron. Weights stay in high precision, so checkpoints do too.
FP8 GEMMs need both dims divisible by 16; other layers keep the high-precision GEMM.
With `fp8.all_gather` (torchao, dp > 1) FSDP2 all-gathers those weights already cast to float8, one byte an
element instead of bf16's two, and `precompute_fp8_scales` after each optimizer step sets their scales.

Where the device has no FP8 GEMM (CPU, GPUs below compute capability 8.9) torchao is
emulated by default (`fp8.emulate=auto`): the same scaling and float8 casts, the matmul
in high precision. `torch._scaled_mm` has only a scalar reference path on CPU, a thousand
times slower than an fp32 matmul; `fp8.emulate=false` asks for it all the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import io
from collections.abc import Iterator

import torch
from torch import nn

from megaolmo.config import Fp8Config
from megaolmo.config.resolve import check_fp8_all_gather
from megaolmo.errors import ConfigError
from megaolmo.parallel import ColumnParallelLinear, RowParallelLinear


def has_fp8_gemm(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` has a real FP8 kernel here: CUDA GPUs of compute capability 8.9+."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def apply_tf32(enabled: bool, device_type: str) -> None:
    """Let CUDA run fp32 GEMMs in TF32 (`trainer.tf32`): torch leaves matmuls in full fp32 unless told.

    Process-wide, so it is set once at start-up; nothing changes on CPU, which has no TF32.
    """
    if device_type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def emulates(linear: str, config: Fp8Config, device: torch.device) -> bool:
    """Whether torchao's FP8 runs emulated (float8 casts and scales, high-precision matmuls) under `fp8.emulate`."""
    if linear != "torchao":
        return False
    return config.emulate == "true" or (config.emulate == "auto" and not has_fp8_gemm(device))


def check_backend(linear: str, device: torch.device, config: Fp8Config | None = None, *, dp: int = 1) -> None:
    """One clear line for an FP8 request this machine (or `dp`, for fp8.all_gather) cannot serve, before anything
    is built."""
    check_fp8_all_gather(linear, config or Fp8Config(), dp)
    if linear == "torch":
        return
    if linear == "torchao" and importlib.util.find_spec("torchao") is None:
        raise ConfigError("model.linear=torchao needs torchao: pip install torchao, or set model.linear=torch")
    if linear == "te":
        if importlib.util.find_spec("transformer_engine") is None:
            raise ConfigError("model.linear=te needs Transformer Engine: pip install -e '.[te]', or use torchao")
        if device.type != "cuda":
            raise ConfigError("model.linear=te needs an NVIDIA GPU; on CPU use model.linear=torchao")
        recipe = (config or Fp8Config()).te_recipe
        if recipe == "mxfp8" and torch.cuda.get_device_capability(device) < (10, 0):
            name = torch.cuda.get_device_name(device)
            raise ConfigError(
                f"fp8.te_recipe=mxfp8 needs a Blackwell GPU (compute capability 10.0+), not {name}; "
                "use fp8.te_recipe=delayed or current"
            )
    if device.type == "cuda" and not has_fp8_gemm(device) and not emulates(linear, config or Fp8Config(), device):
        name = torch.cuda.get_device_name(device)
        hint = "use torch" if linear == "te" else "use torch, or fp8.emulate=auto"
        raise ConfigError(f"model.linear={linear}: {name} has no FP8 (needs compute capability 8.9+); {hint}")


def _fp8_layers(stage: nn.Module, n_layers: int, config: Fp8Config):
    """(name, layer) of every TP linear of the blocks that may run in FP8 (the output head never does)."""
    for block_name, block in stage.blocks.items():
        if config.keep_first_last_blocks_bf16 and int(block_name) in (0, n_layers - 1):
            continue
        for name, layer in block.named_children():
            if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
                yield f"blocks.{block_name}.{name}", layer


def apply_fp8(
    stage: nn.Module, *, linear: str, config: Fp8Config, n_layers: int, amax_group=None, emulate: bool = False
) -> list[str]:
    """Swap the local GEMMs of a materialized, initialized stage; returns the layers left in high precision.

    `emulate` (torchao only): the float8 casts and scaling as usual, the matmuls in high precision.
    """
    if linear == "torch":
        return []
    kept = []
    for name, layer in _fp8_layers(stage, n_layers, config):
        local: nn.Linear = layer.linear
        if local.in_features % 16 or local.out_features % 16:
            kept.append(name)
            continue
        layer.linear = _torchao_linear(local, config, emulate) if linear == "torchao" else _te_linear(local)
    if linear == "te":
        microbatch = _FirstMicrobatch()
        for module in stage.modules():
            if _is_te(module):
                module.forward = functools.partial(_te_linear_forward, module.forward, microbatch)
        stage.forward = functools.partial(
            _te_autocast_forward, stage.forward, te_recipe(config), amax_group, microbatch
        )
        setattr(stage, _MICROBATCH_ATTRIBUTE, microbatch)
    return kept


_MICROBATCH_ATTRIBUTE = "_megaolmo_fp8_microbatch"


class _FirstMicrobatch:
    """What Transformer Engine's `is_first_microbatch` should say to the stage's FP8 linears.

    TE casts a weight to FP8 when told True and reuses that cast when told False: the weights do not change
    within a step, so casting them once per step, not once per micro-batch, is what the step needs. None
    (forward-only passes, whose batches are not a step's) casts every time, as TE does by default.
    """

    def __init__(self) -> None:
        self.fresh, self.value = True, None

    def begin_step(self) -> None:
        self.fresh = True

    def enter_forward(self) -> None:
        """At each stage forward (one micro-batch): True for the step's first, False after, None without grad."""
        if torch.is_grad_enabled():
            self.value, self.fresh = self.fresh, False
        else:
            self.value = None


def begin_fp8_step(stages: list[nn.Module]) -> None:
    """Tell the stages' Transformer Engine linears that a new step (new weights) begins; nothing without TE."""
    for stage in stages:
        microbatch = getattr(stage, _MICROBATCH_ATTRIBUTE, None)
        if microbatch is not None:
            microbatch.begin_step()


def _is_te(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformer_engine")


def _te_linear_forward(forward, microbatch: _FirstMicrobatch, x: torch.Tensor) -> torch.Tensor:
    return forward(x, is_first_microbatch=microbatch.value)


def _torchao_linear(local: nn.Linear, config: Fp8Config, emulate: bool) -> nn.Module:
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    recipe = Float8LinearConfig.from_recipe_name(config.torchao_recipe)  # a frozen dataclass
    recipe = dataclasses.replace(recipe, emulate=emulate, enable_fsdp_float8_all_gather=config.all_gather)
    fp8 = Float8Linear.from_float(local, config=recipe)
    if config.all_gather:  # torchao wrapped the weight for FSDP2; megaolmo's wrapper all-gathers its bytes
        weight = fp8.weight
        fp8.weight = nn.Parameter(
            _float8_all_gather_weight_class()(weight._tensor, weight._linear_mm_config, weight._dtype),
            requires_grad=weight.requires_grad,
        )
    return fp8


@functools.cache
def _float8_all_gather_weight_class() -> type[torch.Tensor]:
    """torchao's FSDP2 float8 weight, all-gathering its float8 bytes as uint8; built once, torchao imported late.

    With `fp8.all_gather`, FSDP2 asks the weight for its all-gather input: torchao casts the local fp32 shard
    to float8 (its scale from the amax over the DP mesh, or the one `precompute_fp8_scales` left) and the
    ranks gather one byte per element instead of bf16's two. FSDP2 gathers a unit's inputs as uint8 only when
    their dtypes differ; a unit of float8 weights alone (OLMo-1's blocks have no norm weights) would be
    gathered as float8, which gloo refuses. This wrapper always hands FSDP2 the uint8 view of the same bytes
    (free on NCCL too) and views the gathered bytes back as float8, so every backend carries it.

    An FSDP2 shard is padded on dim 0 when dp does not divide the rows; the input then carries the padded
    shard's rows, as FSDP2 requires of such a hook. Pickled, it is its high-precision tensor: checkpoints
    hold the same plain weights with fp8.all_gather on or off.
    """
    import torch.utils._pytree as pytree
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    class Float8AllGatherWeight(WeightWithDynamicFloat8CastTensor):
        @classmethod
        def __torch_dispatch__(cls, func, types, args, kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)  # rewraps in torchao's class: back in ours
            return pytree.tree_map_only(
                WeightWithDynamicFloat8CastTensor, lambda t: cls(t._tensor, t._linear_mm_config, t._dtype), out
            )

        @staticmethod
        def __tensor_unflatten__(inner_tensors, flatten_spec, outer_size, outer_stride):
            """torch.compile's rebuild of a weight: this class, and the precomputed scale kept (torchao drops it)."""
            return Float8AllGatherWeight(inner_tensors["_tensor"], flatten_spec["mm_config"], flatten_spec["dtype"],
                                         inner_tensors.get("_precomputed_scale"))  # fmt: skip

        def __reduce_ex__(self, protocol):
            return self._tensor.detach().__reduce_ex__(protocol)  # saved (torch.save) as its plain fp32 tensor

        def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
            (data,), metadata = super().fsdp_pre_all_gather(mesh)
            data, rows = data.view(torch.uint8), -(-outer_size[0] // mesh.size())  # the padded shard's rows
            if data.shape[0] < rows:
                data = torch.cat([data, data.new_zeros(rows - data.shape[0], *data.shape[1:])])
            return (data,), metadata

        def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
            (data,) = all_gather_outputs
            return super().fsdp_post_all_gather((data.view(self._dtype),), metadata, param_dtype, out=out)

    return Float8AllGatherWeight


def precompute_fp8_scales(stages: list[nn.Module], config: Fp8Config) -> None:
    """After each optimizer step with `fp8.all_gather`: every FP8 weight's scale for the next all-gathers.

    One all-reduce (over DP) of all the stage's weight amaxes, instead of one per weight inside each
    all-gather. Without it the all-gathers compute their own scales (correct, slower); after a step that
    skipped it, they would use the previous weights' scales, so call it after every step that changed them.
    A no-op without `fp8.all_gather`.
    """
    if not config.all_gather:
        return
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for stage in stages:  # a stage without FP8 weights (fp8.keep_first_last_blocks_bf16) returns at once
        precompute_float8_dynamic_scale_for_fsdp(stage)


def _te_linear(local: nn.Linear) -> nn.Module:
    import transformer_engine.pytorch as te

    fp8 = te.Linear(local.in_features, local.out_features, bias=False, params_dtype=local.weight.dtype,
                    device=local.weight.device)  # fmt: skip
    with torch.no_grad():
        fp8.weight.copy_(local.weight)
    return fp8


def te_recipe(config: Fp8Config):
    """The Transformer Engine recipe of `fp8.te_recipe`: delayed, current (tensorwise) or mxfp8."""
    from transformer_engine.common import recipe

    fp8_format = getattr(recipe.Format, config.fp8_format)
    if config.te_recipe == "delayed":
        return recipe.DelayedScaling(
            fp8_format=fp8_format,
            margin=config.margin,
            amax_history_len=config.amax_history_len,
            amax_compute_algo=config.amax_compute_algo,
        )
    if config.te_recipe == "current":
        return recipe.Float8CurrentScaling(fp8_format=fp8_format)
    return recipe.MXFP8BlockScaling(fp8_format=fp8_format)


def _te_autocast_forward(forward, recipe, amax_group, microbatch: _FirstMicrobatch, *args, **kwargs):
    """Each stage forward (one micro-batch) inside fp8_autocast, the amax reduced over TP x DP."""
    import transformer_engine.pytorch as te

    microbatch.enter_forward()
    with te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_group):
        return forward(*args, **kwargs)


def scaling_states(stage: nn.Module) -> dict[str, io.BytesIO]:
    """Transformer Engine's FP8 scaling state (amax history, scales) per FP8 module, for checkpoints.

    The amax is reduced over the TP and DP ranks of a stage, so every rank holding a module holds
    the same state: one copy per module name, whatever the layout.
    """
    states = {}
    for name, module in stage.named_modules():
        if _is_te(module):
            buffer = io.BytesIO()
            torch.save(module.get_extra_state(), buffer)
            states[name] = buffer
    return states


def load_scaling_states(stage: nn.Module, states: dict[str, io.BytesIO]) -> None:
    for name, module in stage.named_modules():
        if name in states:
            states[name].seek(0)
            module.set_extra_state(torch.load(states[name], weights_only=False))


@contextlib.contextmanager
def preserved_scaling_states(stages: list[nn.Module]) -> Iterator[None]:
    """Put Transformer Engine's scaling state back after the block: forward-only passes leave no trace in it.

    Under delayed scaling every FP8 forward enters its amax into the history, and the scales follow it. An
    evaluation must not steer the scales of the training that resumes after it, yet it should run the
    same FP8 GEMMs the model trains with; so it runs in FP8 and the state before it is restored (a few KiB per
    module, once per evaluation). A no-op without TE modules.
    """
    saved = [scaling_states(stage) for stage in stages]
    try:
        yield
    finally:
        for stage, states in zip(stages, saved):
            load_scaling_states(stage, states)
