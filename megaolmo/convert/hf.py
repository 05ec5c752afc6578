"""Hugging Face `OlmoForCausalLM` directories <-> megaolmo state dicts (OLMO_REFERENCE.md's mapping).

transformers keeps q, k, v and up, gate as separate tensors; megaolmo fuses them as OLMo does
([q | k | v] in att_proj, [up | gate] in ff_proj). Every read validates the whole input (config,
names, shapes, shards) before anything is converted. Writing streams: `hf_tensors` maps one megaolmo
tensor to its transformers tensors, so `write_hf_dir` holds one megaolmo tensor at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from megaolmo.checkpoint.consolidated import check_specs, check_tensors, expected_shapes, write_atomically
from megaolmo.checkpoint.safetensors_stream import Specs, tensor_bytes, write_safetensors
from megaolmo.config import ModelConfig
from megaolmo.errors import ConfigError, ConversionError

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


# Tensor name mapping


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


def hf_tensors(config: ModelConfig, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The transformers tensors (views of `tensor`) that megaolmo's tensor `name` becomes, in stored order.

    A tied model's lm_head is wte: it has no tensor of its own here, and transformers re-ties it on load.
    """
    hd = config.head_dim
    match name.split("."):
        case ["wte", "weight"]:
            return [("model.embed_tokens.weight", tensor)]
        case ["head", "linear", "weight"]:
            return [("lm_head.weight", tensor)]
        case ["blocks", index, "att_proj", "linear", "weight"]:
            q, k, v = tensor.split([config.n_heads * hd, config.kv_heads * hd, config.kv_heads * hd], dim=0)
            attn = f"model.layers.{index}.self_attn"
            return [(f"{attn}.q_proj.weight", q), (f"{attn}.k_proj.weight", k), (f"{attn}.v_proj.weight", v)]
        case ["blocks", index, "attn_out", "linear", "weight"]:
            return [(f"model.layers.{index}.self_attn.o_proj.weight", tensor)]
        case ["blocks", index, "ff_proj", "linear", "weight"]:
            up, gate = tensor.chunk(2, dim=0)
            return [
                (f"model.layers.{index}.mlp.up_proj.weight", up),
                (f"model.layers.{index}.mlp.gate_proj.weight", gate),
            ]
        case ["blocks", index, "ff_out", "linear", "weight"]:
            return [(f"model.layers.{index}.mlp.down_proj.weight", tensor)]
    raise ValueError(f"{name} is not a tensor of a megaolmo OLMo-1 model")  # the callers validate names first


def state_to_hf(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers tensors from a megaolmo state_dict (the inverse of `state_from_hf`); lm_head.weight
    is wte for a tied model, as in transformers' own state_dict."""
    hf = {hf_name: part for name, tensor in state.items() for hf_name, part in hf_tensors(config, name, tensor)}
    if config.weight_tying:
        hf["lm_head.weight"] = state["wte.weight"]
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


def write_hf_dir(
    path: Path,
    config: ModelConfig,
    specs: Specs,
    read: Callable[[str], torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int,
) -> None:
    """A directory `OlmoForCausalLM.from_pretrained` loads, sharded with an index past `max_shard_bytes`.

    `specs` names the megaolmo tensors (validated against `config` before anything is written); each is
    read once with `read(name)`, cast to `dtype` when given, and dropped when the last of its transformers
    tensors is written. Those are stored in the model's order, a source's parts one after the other (q, k, v
    may still fall into two shards), so at most one megaolmo tensor is in memory at a time.
    """
    check_specs(config, specs, "tensors to convert")
    source: dict[str, str] = {}  # transformers name -> the megaolmo tensor it is part of
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name in expected_shapes(config):
        shape, saved = specs[name]
        for hf_name, part in hf_tensors(config, name, torch.empty(shape, dtype=dtype or saved, device="meta")):
            source[hf_name] = name
            layout[hf_name] = (tuple(part.shape), part.dtype)
    shards: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = [{}]
    shard_bytes = 0
    for hf_name, spec in layout.items():
        size = tensor_bytes(*spec)
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][hf_name] = spec
        shard_bytes += size

    parts: dict[str, torch.Tensor] = {}  # the parts of the megaolmo tensor being written that are still to go

    def read_part(hf_name: str) -> torch.Tensor:
        if hf_name not in parts:  # the parts before are all written: the previous tensor is free
            name = source[hf_name]
            parts.update(hf_tensors(config, name, read(name).to(layout[hf_name][1])))
        return parts.pop(hf_name)

    def write(tmp: Path) -> None:
        hf_config = config_to_hf(config, dtype or specs["wte.weight"][1])
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if len(shards) == 1:
            write_safetensors(tmp / "model.safetensors", shards[0], read_part)
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / name, shard, read_part)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(tensor_bytes(*spec) for spec in layout.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    write_atomically(path, write)
