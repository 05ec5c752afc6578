"""Reading allenai/OLMo's own unsharded checkpoints: config.yaml plus model.pt or model.safetensors.

OLMo names its tensors `transformer.wte`, `transformer.blocks.{i}.att_proj` (fused q/k/v),
`attn_out`, `ff_proj` ([up | gate]), `ff_out` and `transformer.ff_out` (an untied head): the
same fusion as megaolmo's, so converting is renaming. Two sets of options are read: OLMo-1's
(a parameter-free LayerNorm before each sublayer) and OLMo-2's (`layer_norm_type: rms` with
weights, `attention_layer_norm: true` for QK-norm, `norm_after: true`), whose norms are
`attn_norm`, `ff_norm`, `q_norm`, `k_norm` and `transformer.ln_f` there as here. Anything else
(biases, ALiBi, LayerNorm with affine weights, ...) is refused in one line.
"""

from __future__ import annotations

import base64
import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from megaolmo.checkpoint.consolidated import check_tensors, expected_shapes
from megaolmo.config import ModelConfig
from megaolmo.convert.hf import read_safetensors
from megaolmo.errors import ConfigError, ConversionError

# The options that make a block OLMo-1's or OLMo-2's, and their values in each (absent keys take OLMo-1's).
_GENERATION_OPTIONS = {
    "olmo1": {
        "layer_norm_type": "default",
        "layer_norm_with_affine": False,
        "attention_layer_norm": False,
        "norm_after": False,
    },
    "olmo2": {
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "attention_layer_norm": True,
        "attention_layer_norm_with_affine": True,
        "norm_after": True,
    },
}
_REQUIRED_VALUES = {
    "include_bias": False,
    "bias_for_layer_norm": None,
    "alibi": False,
    "rope": True,
    "block_type": "sequential",
    "activation_type": "swiglu",
    "scale_logits": False,
}


def _generation(model: Mapping[str, Any], source: str) -> str:
    """olmo1 or olmo2, from the norm options; a mixture of the two is refused naming the first odd key."""
    arch = "olmo2" if model.get("layer_norm_type") in ("rms", "amd_compatible_rms") else "olmo1"
    for key, wanted in _GENERATION_OPTIONS[arch].items():
        value = model.get(key, _GENERATION_OPTIONS["olmo1"].get(key, wanted))
        if arch == "olmo2" and key == "layer_norm_type":
            continue  # amd_compatible_rms computes the same function
        if value != wanted:
            generation = "OLMo-1" if arch == "olmo1" else "OLMo-2 (layer_norm_type: rms)"
            raise ConversionError(f"{source}: model.{key}={value!r} is not supported; {generation} uses {wanted!r}")
    return arch


def _init_fn(arch: str, model: Mapping[str, Any]) -> str:
    """megaolmo's init_fn for OLMo's: auto where it is the generation's own (mitchell for OLMo-1, normal for
    OLMo-2), else named; OLMo's other schemes become mitchell, the nearest (a continued run never reinitializes)."""
    init = "normal" if model.get("init_fn") == "normal" else "mitchell"
    return "auto" if init == {"olmo1": "mitchell", "olmo2": "normal"}[arch] else init


def config_from_olmo(model: Mapping[str, Any], source: str) -> ModelConfig:
    """ModelConfig of the `model:` section of an OLMo config.yaml: OLMo-1's options or OLMo-2's."""
    arch = _generation(model, source)
    for key, wanted in _REQUIRED_VALUES.items():
        value = model.get(key, wanted)
        if value != wanted and not (key == "bias_for_layer_norm" and not value):
            raise ConversionError(f"{source}: model.{key}={value!r} is not supported; OLMo uses {wanted!r}")
    try:
        d_model, n_heads = model["d_model"], model["n_heads"]
        hidden = model.get("mlp_hidden_size") or model.get("mlp_ratio", 4) * d_model  # ff_proj output, 2F
        n_kv_heads = model.get("n_kv_heads") or (1 if model.get("multi_query_attention") else n_heads)
        return ModelConfig(
            arch=arch,
            d_model=d_model,
            n_layers=model["n_layers"],
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            ffn_hidden_size=hidden // 2,
            vocab_size=model["vocab_size"],
            embedding_size=model.get("embedding_size") or model["vocab_size"],
            max_sequence_length=model.get("max_sequence_length", 2048),
            rope_theta=float(model.get("rope_theta", 10000.0)),
            clip_qkv=model.get("clip_qkv"),
            weight_tying=bool(model.get("weight_tying", True)),
            layer_norm_eps=float(model.get("layer_norm_eps", 1e-5)),
            init_fn=_init_fn(arch, model),
            init_std=float(model.get("init_std", 0.02)),
            eos_token_id=model.get("eos_token_id", 50279) or 50279,  # the 65B/70B configs say 0 by mistake
            pad_token_id=model.get("pad_token_id", 1),
        )
    except KeyError as err:
        raise ConversionError(f"{source}: required key model.{err.args[0]} is missing") from None
    except ConfigError as err:
        raise ConversionError(f"{source}: {err}") from None


class _NoGlobalsUnpickler(pickle.Unpickler):
    """OLMo's safetensors keys are pickled tuples of strings; refuse anything that needs a global."""

    def find_class(self, module: str, name: str) -> Any:
        raise ConversionError(f"refusing to unpickle {module}.{name} from a safetensors key")


def _olmo_key(key: str) -> str:
    """A plain dotted name, or the dotted form of OLMo's base64(pickle((keys, is_pickled))) encoding."""
    if "." in key:
        return key
    try:
        raw = base64.urlsafe_b64decode(key)
        keys, _is_pickled = _NoGlobalsUnpickler(io.BytesIO(raw)).load()
    except (ValueError, pickle.UnpicklingError, EOFError, TypeError):
        return key
    return ".".join(str(k) for k in keys)


def read_olmo_dir(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    if not path.is_dir():
        raise ConversionError(f"OLMo checkpoint directory {path} does not exist")
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise ConversionError(f"{path}: config.yaml is missing")
    try:
        yaml_config = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConversionError(f"{config_file} is not valid YAML ({err})") from None
    if "model" not in yaml_config:
        raise ConversionError(f"{config_file} has no model: section")
    config = config_from_olmo(yaml_config["model"], str(config_file))
    if (path / "model.safetensors").is_file():
        raw = read_safetensors([path / "model.safetensors"])
    elif (path / "model.pt").is_file():
        try:
            raw = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            raise ConversionError(f"{path / 'model.pt'} cannot be read ({err})") from None
    else:
        raise ConversionError(f"{path} has neither model.pt nor model.safetensors (an unsharded OLMo checkpoint)")
    tensors = {_olmo_key(k).removeprefix("model."): v for k, v in raw.items()}
    return config, state_from_olmo(config, tensors, str(path))


def _name_to_olmo(name: str) -> str:
    if name == "head.linear.weight":
        return "transformer.ff_out.weight"
    return "transformer." + name.replace(".linear.weight", ".weight")


def state_from_olmo(config: ModelConfig, olmo: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """megaolmo names from OLMo's (`transformer.wte`, `transformer.blocks.{i}.att_proj`, `transformer.ff_out`)."""
    shapes = expected_shapes(config)
    ours_by_olmo_name = {_name_to_olmo(name): name for name in shapes}
    check_tensors({_name_to_olmo(name): shape for name, shape in shapes.items()}, olmo, source)
    return {ours_by_olmo_name[name]: tensor for name, tensor in olmo.items()}
