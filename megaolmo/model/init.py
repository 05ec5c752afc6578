"""OLMo's initializations, independent of the parallel layout.

- mitchell (OLMo-1): a truncated normal of std 1/sqrt(d) for inputs, the output projections' std
  scaled by depth (1/sqrt(2 d (layer + 1))), each cut at 3 std.
- normal (OLMo-2/3): every weight, the embedding included, N(0, init_std) cut at 3 std.

Norm weights start at one in both.

Every parameter is drawn whole from a generator seeded by (seed, parameter
name), and each rank keeps its tensor-parallel slice of it. The weights of a
run therefore depend on the seed alone: one process, TP x PP x DP, or a resume
on another layout all start from the same model.

The draw happens on the CPU whatever the parameter's device: a CUDA generator
yields other numbers than a CPU one for the same seed, so drawing on the device
would make a GPU run start from other weights than a CPU run. One parameter is
drawn at a time (the largest, the embedding, is vocab x d_model floats), then
its slice is copied to the device.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from torch import nn

from megaolmo.config import ModelConfig
from megaolmo.parallel.layers import tensor_parallel_layers

_BLOCK_WEIGHT = re.compile(r"blocks\.(\d+)\.(att_proj|attn_out|ff_proj|ff_out)\.linear\.weight")
_NORM_WEIGHT = re.compile(r"(blocks\.(\d+)\.(attn_norm|ff_norm|q_norm|k_norm)|ln_f)\.weight")


def _block_weight(name: str) -> tuple[int, str]:
    match = _BLOCK_WEIGHT.fullmatch(name)
    if match is None:
        raise ValueError(f"no initialization rule for parameter {name}")
    return int(match[1]), match[2]


def is_norm_weight(name: str) -> bool:
    """Whether a parameter is a norm's weight (OLMo-2/3), which starts at one."""
    return _NORM_WEIGHT.fullmatch(name) is not None


def mitchell_std(config: ModelConfig, name: str) -> float:
    """Truncated-normal std of a parameter: 1/sqrt(d) for inputs, output projections scaled by depth."""
    if name in ("wte.weight", "head.linear.weight"):
        return config.d_model**-0.5
    layer, kind = _block_weight(name)
    if kind == "attn_out":
        return 1 / math.sqrt(2 * config.d_model * (layer + 1))
    if kind == "ff_out":
        return 1 / math.sqrt(2 * config.ffn_hidden_size * (layer + 1))
    return config.d_model**-0.5


def init_std(config: ModelConfig, name: str) -> float:
    """The std the model's initialization draws a (non-norm) weight with."""
    if config.init_method == "mitchell":
        return mitchell_std(config, name)
    if name not in ("wte.weight", "head.linear.weight"):
        _block_weight(name)  # refuses a parameter without a rule, as mitchell_std does
    return config.init_std


def full_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    """Shape of a parameter in the unsharded model."""
    d, hd = config.d_model, config.head_dim
    if name in ("wte.weight", "head.linear.weight"):
        return (config.padded_vocab_size, d)
    norm = _NORM_WEIGHT.fullmatch(name)
    if norm is not None:
        heads = {"q_norm": config.n_heads, "k_norm": config.kv_heads}.get(norm[3])
        return (d,) if heads is None else (heads * hd,)
    _, kind = _block_weight(name)
    return {
        "att_proj": ((config.n_heads + 2 * config.kv_heads) * hd, d),
        "attn_out": (d, config.n_heads * hd),
        "ff_proj": (2 * config.ffn_hidden_size, d),
        "ff_out": (d, config.ffn_hidden_size),
    }[kind]


def parameter_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % 2**63


@torch.no_grad()
def init_parameters(module: nn.Module, config: ModelConfig, seed: int) -> None:
    """Initialize every parameter of `module` (a whole OLMo or a TP-sharded pipeline stage of one)."""
    owners = tensor_parallel_layers(module)
    for name, param in module.named_parameters():
        if is_norm_weight(name):
            param.fill_(1.0)
            continue
        std = init_std(config, name)
        generator = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, name))
        full = torch.empty(full_shape(config, name), device="cpu", dtype=torch.float32)
        nn.init.trunc_normal_(full, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        param.copy_(owners[name].shard_full(full))
