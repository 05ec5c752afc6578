"""Convert between megaolmo checkpoints, Hugging Face `OlmoForCausalLM` and allenai/OLMo checkpoints.

    python -m megaolmo.convert from-hf   HF_DIR    OUT_DIR
    python -m megaolmo.convert to-hf     CKPT_DIR  HF_DIR
    python -m megaolmo.convert from-olmo OLMO_DIR  OUT_DIR
    python -m megaolmo.convert consolidate CKPT_DIR OUT_DIR   (a sharded training checkpoint, any layout)

Every input is validated in full (config, tensor names, shapes, shards) before
anything is written; a bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megaolmo.checkpoint import (
    CheckpointError,
    check_tensors,
    expected_shapes,
    load_model_state,
    save_consolidated,
    write_atomically,
)
from megaolmo.config import ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(CheckpointError):
    """An input that cannot be converted; the message names the file or value at fault."""


# ---------------------------------------------------------------------------------------------
# Hugging Face config <-> ModelConfig


def config_from_hf(hf: Mapping[str, Any], source: str) -> ModelConfig:
    """ModelConfig of a transformers OlmoConfig dict; other architectures are refused."""
    model_type = hf.get("model_type")
    if model_type != "olmo":
        raise ConversionError(f"{source}: model_type={model_type!r} is not OLMo-1; from-hf converts model_type 'olmo'")
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ConversionError(f"{source}: {key}={value!r} is not supported; OLMo-1 uses {wanted!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConversionError(f"{source}: rope scaling {rope!r} is not supported; OLMo-1 uses plain RoPE")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    n_heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // n_heads):
        raise ConversionError(f"{source}: head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads")
    try:
        return ModelConfig(
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_hidden_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            embedding_size=hf["vocab_size"],
            max_sequence_length=hf.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            clip_qkv=hf.get("clip_qkv"),
            weight_tying=bool(hf.get("tie_word_embeddings", False)),
            eos_token_id=hf.get("eos_token_id", 50279),
            pad_token_id=hf.get("pad_token_id", 1),
        )
    except KeyError as err:
        raise ConversionError(f"{source}: required key {err.args[0]!r} is missing") from None
    except ConfigError as err:
        raise ConversionError(f"{source}: {err}") from None


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of a transformers OlmoForCausalLM (4.x and 5.x read it); vocab_size is the padded size."""
    return {
        "architectures": ["OlmoForCausalLM"],
        "model_type": "olmo",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "intermediate_size": config.ffn_hidden_size,
        "vocab_size": config.padded_vocab_size,
        "max_position_embeddings": config.max_sequence_length,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "clip_qkv": config.clip_qkv,
        "tie_word_embeddings": config.weight_tying,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": None,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------------------------------------
# Tensor name mapping (OLMO_REFERENCE.md, "Hugging Face mapping")


def state_from_hf(config: ModelConfig, hf: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """megaolmo state_dict from transformers tensors: q/k/v fused into att_proj, [up | gate] into ff_proj."""
    tied_head = "lm_head.weight" if config.weight_tying else None  # transformers may or may not save it

    def ignore(name: str) -> bool:
        return name == tied_head or name.endswith("rotary_emb.inv_freq")

    check_tensors(hf_shapes(config), hf, source, ignore)
    state = {"wte.weight": hf["model.embed_tokens.weight"]}
    for i in range(config.n_layers):
        hf_layer = f"model.layers.{i}"
        ours = f"blocks.{i}"
        attn = [hf[f"{hf_layer}.self_attn.{p}_proj.weight"] for p in "qkv"]
        state[f"{ours}.att_proj.linear.weight"] = torch.cat(attn, dim=0)
        state[f"{ours}.attn_out.linear.weight"] = hf[f"{hf_layer}.self_attn.o_proj.weight"]
        up, gate = hf[f"{hf_layer}.mlp.up_proj.weight"], hf[f"{hf_layer}.mlp.gate_proj.weight"]
        state[f"{ours}.ff_proj.linear.weight"] = torch.cat([up, gate], dim=0)
        state[f"{ours}.ff_out.linear.weight"] = hf[f"{hf_layer}.mlp.down_proj.weight"]
    if not config.weight_tying:
        state["head.linear.weight"] = hf["lm_head.weight"]
    return state


def state_to_hf(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers tensors from a megaolmo state_dict (the inverse of `state_from_hf`)."""
    hd = config.head_dim
    qkv_sizes = [config.n_heads * hd, config.kv_heads * hd, config.kv_heads * hd]
    hf = {"model.embed_tokens.weight": state["wte.weight"]}
    for i in range(config.n_layers):
        hf_layer = f"model.layers.{i}"
        ours = f"blocks.{i}"
        q, k, v = state[f"{ours}.att_proj.linear.weight"].split(qkv_sizes, dim=0)
        hf[f"{hf_layer}.self_attn.q_proj.weight"] = q
        hf[f"{hf_layer}.self_attn.k_proj.weight"] = k
        hf[f"{hf_layer}.self_attn.v_proj.weight"] = v
        hf[f"{hf_layer}.self_attn.o_proj.weight"] = state[f"{ours}.attn_out.linear.weight"]
        up, gate = state[f"{ours}.ff_proj.linear.weight"].chunk(2, dim=0)
        hf[f"{hf_layer}.mlp.up_proj.weight"] = up
        hf[f"{hf_layer}.mlp.gate_proj.weight"] = gate
        hf[f"{hf_layer}.mlp.down_proj.weight"] = state[f"{ours}.ff_out.linear.weight"]
    hf["lm_head.weight"] = state["wte.weight" if config.weight_tying else "head.linear.weight"]
    return hf


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Name -> shape of every tensor an OlmoForCausalLM of this config must provide."""
    d, hd, ffn = config.d_model, config.head_dim, config.ffn_hidden_size
    shapes = {"model.embed_tokens.weight": (config.padded_vocab_size, d)}
    for i in range(config.n_layers):
        layer = f"model.layers.{i}"
        shapes[f"{layer}.self_attn.q_proj.weight"] = (config.n_heads * hd, d)
        shapes[f"{layer}.self_attn.k_proj.weight"] = (config.kv_heads * hd, d)
        shapes[f"{layer}.self_attn.v_proj.weight"] = (config.kv_heads * hd, d)
        shapes[f"{layer}.self_attn.o_proj.weight"] = (d, config.n_heads * hd)
        shapes[f"{layer}.mlp.up_proj.weight"] = (ffn, d)
        shapes[f"{layer}.mlp.gate_proj.weight"] = (ffn, d)
        shapes[f"{layer}.mlp.down_proj.weight"] = (d, ffn)
    if not config.weight_tying:
        shapes["lm_head.weight"] = (config.padded_vocab_size, d)
    return shapes


# ---------------------------------------------------------------------------------------------
# Reading and writing Hugging Face directories


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON ({err})") from None


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                names = handle.keys()
                tensors.update((name, handle.get_tensor(name)) for name in names)
        except (SafetensorError, OSError) as err:
            raise ConversionError(f"{file} is not a readable safetensors file ({err})") from None
    return tensors


def read_hf_dir(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a transformers model directory (one safetensors file or an indexed set)."""
    if not path.is_dir():
        raise ConversionError(f"Hugging Face directory {path} does not exist")
    config = config_from_hf(read_json(path / "config.json"), str(path / "config.json"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConversionError(f"{path}: shard {missing[0]} listed in {index.name} is missing")
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise ConversionError(
            f"{path} has no model.safetensors or model.safetensors.index.json; "
            "save the model with save_pretrained(..., safe_serialization=True)"
        )
    return config, read_safetensors(files)


def write_hf_dir(path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """A directory `OlmoForCausalLM.from_pretrained` loads; shards with an index past `max_shard_bytes`."""
    if config.weight_tying:  # lm_head is wte: safetensors refuses shared memory, and transformers re-ties it
        tensors = {name: t for name, t in tensors.items() if name != "lm_head.weight"}
    dtype = next(iter(tensors.values())).dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor.contiguous()
        shard_bytes += size

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    write_atomically(path, write)


# ---------------------------------------------------------------------------------------------
# allenai/OLMo unsharded checkpoints (config.yaml + model.pt or model.safetensors)


def config_from_olmo(model: Mapping[str, Any], source: str) -> ModelConfig:
    """ModelConfig of the `model:` section of an OLMo config.yaml; OLMo-1 features only."""
    required_values = {
        "layer_norm_with_affine": False,
        "include_bias": False,
        "bias_for_layer_norm": None,
        "attention_layer_norm": False,
        "alibi": False,
        "rope": True,
        "block_type": "sequential",
        "activation_type": "swiglu",
        "layer_norm_type": "default",
        "norm_after": False,
        "scale_logits": False,
    }
    for key, wanted in required_values.items():
        value = model.get(key, wanted)
        if value != wanted and not (key == "bias_for_layer_norm" and not value):
            raise ConversionError(f"{source}: model.{key}={value!r} is not supported; OLMo-1 uses {wanted!r}")
    try:
        d_model, n_heads = model["d_model"], model["n_heads"]
        hidden = model.get("mlp_hidden_size") or model.get("mlp_ratio", 4) * d_model  # ff_proj output, 2F
        n_kv_heads = model.get("n_kv_heads") or (1 if model.get("multi_query_attention") else n_heads)
        return ModelConfig(
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


# ---------------------------------------------------------------------------------------------
# Command line


def cast(state: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    return state if dtype is None else {k: v.to(DTYPES[dtype]) for k, v in state.items()}


def from_hf(args: argparse.Namespace) -> None:
    config, tensors = read_hf_dir(Path(args.src))
    state = state_from_hf(config, tensors, str(args.src))
    save_consolidated(args.dst, config, cast(state, args.dtype))


def to_hf(args: argparse.Namespace) -> None:
    config, state = load_model_state(args.src)
    tensors = state_to_hf(config, cast(state, args.dtype))
    write_hf_dir(Path(args.dst), config, tensors, int(args.max_shard_gb * 2**30))


def consolidate(args: argparse.Namespace) -> None:
    config, state = load_model_state(args.src)
    save_consolidated(args.dst, config, cast(state, args.dtype))


def from_olmo(args: argparse.Namespace) -> None:
    config, state = read_olmo_dir(Path(args.src))
    save_consolidated(args.dst, config, cast(state, args.dtype))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megaolmo.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func, src, dst in (
        ("from-hf", from_hf, "HF_DIR", "OUT_DIR"),
        ("to-hf", to_hf, "CKPT_DIR", "HF_DIR"),
        ("from-olmo", from_olmo, "OLMO_DIR", "OUT_DIR"),
        ("consolidate", consolidate, "CKPT_DIR", "OUT_DIR"),
    ):
        sub = commands.add_parser(name, help=f"{src} -> {dst}")
        sub.add_argument("src", metavar=src)
        sub.add_argument("dst", metavar=dst, help="a new (or empty) directory")
        sub.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep their dtype)")
        if name == "to-hf":
            sub.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard")
        sub.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
