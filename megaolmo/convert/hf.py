"""Hugging Face `OlmoForCausalLM`, `Olmo2ForCausalLM` and `Olmo3ForCausalLM` directories <-> megaolmo state dicts.

OLMO_REFERENCE.md has OLMo-1's mapping; OLMo-2/3 add one transformers tensor per norm weight
(`post_attention_layernorm` is megaolmo's `attn_norm`, `post_feedforward_layernorm` its `ff_norm`,
`self_attn.q_norm`/`k_norm` its `q_norm`/`k_norm`, `model.norm` its `ln_f`).

transformers keeps q, k, v and up, gate as separate tensors; megaolmo fuses them as OLMo does
([q | k | v] in att_proj, [up | gate] in ff_proj). Every read validates the whole input (config,
names, shapes, shards) before anything is converted. Writing streams: `hf_tensors` maps one megaolmo
tensor to its transformers tensors, so `write_hf_dir` holds one megaolmo tensor at a time.
"""

from __future__ import annotations

import json
import math
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

HF_ARCHITECTURES = {"olmo": "olmo1", "olmo2": "olmo2", "olmo3": "olmo3"}  # model_type -> model.arch
HF_CLASSES = {"olmo1": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM"}


# transformers' defaults for keys a config.json may leave out (OlmoConfig, Olmo2Config, Olmo3Config).
_HF_DEFAULT_THETA = {"olmo1": 10000.0, "olmo2": 10000.0, "olmo3": 500000.0}
_HF_DEFAULT_RMS_NORM_EPS = 1e-5
_HF_DEFAULT_SLIDING_WINDOW = 4096
_YARN_DEFAULT_BETAS = {"beta_fast": 32.0, "beta_slow": 1.0}


def _yarn_attention_factor(rope: Mapping[str, Any], factor: float) -> float | None:
    """YaRN's cos/sin scale as transformers computes it: `attention_factor`, else DeepSeek's mscale ratio when
    both `mscale` and `mscale_all_dim` are set, else None (0.1 ln(factor) + 1, megaolmo's default too)."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):
        return None

    def get_mscale(scale: float, m: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))


def _rope_from_hf(hf: Mapping[str, Any], arch: str, source: str) -> dict[str, Any]:
    """ModelConfig's RoPE fields from transformers' `rope_parameters` (5.x) or `rope_theta`/`rope_scaling` (4.x).

    OLMo-3 keeps one entry per layer type: the sliding layers must rotate plainly (YaRN goes on the
    full-attention layers, as in OLMo-3's long-context stage), with the same theta as the full ones.
    What megaolmo's RoPE cannot rotate exactly as transformers does is refused: other rope types, a partial
    rotary dimension, OLMo-2's YaRN with `truncate: false`; DeepSeek's mscale pair becomes its attention factor.
    """
    rope = hf.get("rope_parameters") or {}
    if arch == "olmo3" and rope:
        sliding, rope = rope.get("sliding_attention") or {}, rope.get("full_attention") or {}
        if sliding.get("rope_type", "default") != "default":
            raise ConversionError(f"{source}: rope_parameters.sliding_attention={sliding!r} is not plain RoPE")
        if sliding.get("rope_theta", rope.get("rope_theta")) != rope.get("rope_theta"):
            raise ConversionError(f"{source}: sliding and full attention layers have different rope_theta")
    if not rope.get("rope_type", rope.get("type")):
        rope = {**(hf.get("rope_scaling") or {}), **rope}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", _HF_DEFAULT_THETA[arch])))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta}
    if kind != "yarn":
        raise ConversionError(f"{source}: rope scaling {rope!r} is not supported; megaolmo has plain RoPE and YaRN")
    # transformers reads `truncate` from the top of rope_parameters: OLMo-3's per-layer-type dict never has it
    # there, so Olmo3ForCausalLM truncates whatever full_attention says, as megaolmo does.
    unsupported = (
        {"partial_rotary_factor": 1.0} if arch == "olmo3" else {"partial_rotary_factor": 1.0, "truncate": True}
    )
    for key, wanted in unsupported.items():
        value = rope.get(key, hf.get(key, wanted))
        if value != wanted:
            raise ConversionError(f"{source}: rope {key}={value!r} is not supported; megaolmo's YaRN uses {wanted!r}")
    original = rope.get("original_max_position_embeddings")
    factor = float(rope.get("factor") or hf.get("max_position_embeddings", 0) / (original or 1))
    return {
        "rope_theta": theta,
        "rope_scaling": "yarn",
        "rope_scaling_factor": factor,
        "rope_original_max_position": original,
        **{f"yarn_{beta}": float(rope.get(beta) or default) for beta, default in _YARN_DEFAULT_BETAS.items()},
        "yarn_attention_factor": _yarn_attention_factor(rope, factor),
    }


def config_from_hf(hf: Mapping[str, Any], source: str) -> ModelConfig:
    """ModelConfig of a transformers OlmoConfig, Olmo2Config or Olmo3Config dict; other models are refused."""
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ConversionError(
            f"{source}: model_type={model_type!r} is not an OLMo; from-hf converts {', '.join(HF_ARCHITECTURES)}"
        )
    arch = HF_ARCHITECTURES[model_type]
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ConversionError(f"{source}: {key}={value!r} is not supported; OLMo uses {wanted!r}")
    n_heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // n_heads):
        raise ConversionError(f"{source}: head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads")
    generation: dict[str, Any] = {"clip_qkv": hf.get("clip_qkv")}
    if arch != "olmo1":
        generation = {"layer_norm_eps": float(hf.get("rms_norm_eps", _HF_DEFAULT_RMS_NORM_EPS))}
    if arch == "olmo3":
        generation["sliding_window"] = hf.get("sliding_window", _HF_DEFAULT_SLIDING_WINDOW)
        generation["layer_types"] = hf.get("layer_types")
    try:
        return ModelConfig(
            arch=arch,
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_hidden_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            embedding_size=hf["vocab_size"],
            max_sequence_length=hf.get("max_position_embeddings", 2048),
            weight_tying=bool(hf.get("tie_word_embeddings", False)),
            eos_token_id=hf.get("eos_token_id", 50279),
            pad_token_id=hf.get("pad_token_id", 1),
            init_std=float(hf.get("initializer_range", 0.02)),
            **_rope_from_hf(hf, arch, source),
            **generation,
        )
    except KeyError as err:
        raise ConversionError(f"{source}: required key {err.args[0]!r} is missing") from None
    except ConfigError as err:
        raise ConversionError(f"{source}: {err}") from None


def _rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    """RoPE as both transformers 5.x (`rope_parameters`) and 4.x (`rope_theta`, `rope_scaling`) read it.

    YaRN's optional keys are written where they differ from transformers' defaults (betas 32 and 1, the
    attention factor from `factor`), so a config that leaves them out reads back the same.
    """
    plain = {"rope_type": "default", "rope_theta": config.rope_theta}
    full = plain
    if config.rope_scaling is not None:
        full = {
            "rope_type": "yarn",
            "rope_theta": config.rope_theta,
            "factor": config.rope_scaling_factor,
            "original_max_position_embeddings": config.rope_original_max_position,
        }
        for beta, default in _YARN_DEFAULT_BETAS.items():
            if getattr(config, f"yarn_{beta}") != default:
                full[beta] = getattr(config, f"yarn_{beta}")
        if config.yarn_attention_factor is not None:
            full["attention_factor"] = config.yarn_attention_factor
    legacy = {"rope_theta": config.rope_theta, "rope_scaling": None if full is plain else full}
    if config.arch == "olmo3":
        return {**legacy, "rope_parameters": {"full_attention": full, "sliding_attention": plain}}
    return {**legacy, "rope_parameters": full}


def check_hf_expressible(config: ModelConfig, source: str) -> None:
    """Refuse a model that the generation's transformers class would compute differently: it has no clip_qkv
    (OLMo-2/3), no LayerNorm epsilon but 1e-5 (OLMo-1), and transformers 4.x derives YaRN's factor from the
    context lengths."""
    if config.arch != "olmo1" and config.clip_qkv is not None:
        raise ConversionError(
            f"{source}: model.clip_qkv={config.clip_qkv} cannot be converted; transformers' "
            f"{HF_CLASSES[config.arch]} does not clip q, k and v"
        )
    if config.rope_scaling is not None and config.max_sequence_length != round(
        config.rope_scaling_factor * config.rope_original_max_position
    ):
        raise ConversionError(
            f"{source}: model.max_sequence_length={config.max_sequence_length} is not rope_scaling_factor x "
            f"rope_original_max_position ({config.rope_scaling_factor} x {config.rope_original_max_position}); "
            "transformers 4.x takes YaRN's factor from their ratio, so set it to the product before converting"
        )
    if config.arch == "olmo1" and config.layer_norm_eps != 1e-5:
        raise ConversionError(
            f"{source}: model.layer_norm_eps={config.layer_norm_eps} cannot be converted; transformers' "
            "OlmoForCausalLM's LayerNorm uses 1e-5"
        )


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the transformers class of the model's generation (4.x and 5.x read it); vocab_size is
    the padded size."""
    model_type = next(name for name, arch in HF_ARCHITECTURES.items() if arch == config.arch)
    hf = {
        "architectures": [HF_CLASSES[config.arch]],
        "model_type": model_type,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "intermediate_size": config.ffn_hidden_size,
        "vocab_size": config.padded_vocab_size,
        "max_position_embeddings": config.max_sequence_length,
        **_rope_to_hf(config),
        "tie_word_embeddings": config.weight_tying,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": None,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.arch == "olmo1":
        hf["clip_qkv"] = config.clip_qkv
    else:
        hf["rms_norm_eps"] = config.layer_norm_eps
    if config.arch == "olmo3":
        hf["sliding_window"] = config.sliding_window
        hf["layer_types"] = config.block_layer_types
    return hf


# Tensor name mapping


# OLMo-2/3's norm weights, one transformers tensor each: megaolmo's name in block i -> transformers'.
_NORMS = {
    "attn_norm": "post_attention_layernorm",
    "ff_norm": "post_feedforward_layernorm",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
}


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
        if config.norm_after:
            state.update(
                {f"{ours}.{norm}.weight": hf[f"{hf_layer}.{theirs}.weight"] for norm, theirs in _NORMS.items()}
            )
    if config.norm_after:
        state["ln_f.weight"] = hf["model.norm.weight"]
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
        case ["blocks", index, norm, "weight"] if norm in _NORMS:
            return [(f"model.layers.{index}.{_NORMS[norm]}.weight", tensor)]
        case ["ln_f", "weight"]:
            return [("model.norm.weight", tensor)]
    raise ValueError(f"{name} is not a tensor of a megaolmo OLMo model")  # the callers validate names first


def state_to_hf(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers tensors from a megaolmo state_dict (the inverse of `state_from_hf`); lm_head.weight
    is wte for a tied model, as in transformers' own state_dict."""
    hf = {hf_name: part for name, tensor in state.items() for hf_name, part in hf_tensors(config, name, tensor)}
    if config.weight_tying:
        hf["lm_head.weight"] = state["wte.weight"]
    return hf


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a transformers model of this config must provide."""
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
        if config.norm_after:
            shapes[f"{layer}.post_attention_layernorm.weight"] = (d,)
            shapes[f"{layer}.post_feedforward_layernorm.weight"] = (d,)
            shapes[f"{layer}.self_attn.q_norm.weight"] = (config.n_heads * hd,)
            shapes[f"{layer}.self_attn.k_norm.weight"] = (config.kv_heads * hd,)
    if config.norm_after:
        shapes["model.norm.weight"] = (d,)
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
    source: str,
) -> None:
    """A directory the generation's transformers class (`Olmo2ForCausalLM`, ...) loads, sharded with an index
    past `max_shard_bytes`; a model that class would compute differently is refused first (`source` names it).

    `specs` names the megaolmo tensors (validated against `config` before anything is written); each is
    read once with `read(name)`, cast to `dtype` when given, and dropped when the last of its transformers
    tensors is written. Those are stored in the model's order, a source's parts one after the other (q, k, v
    may still fall into two shards), so at most one megaolmo tensor is in memory at a time.
    """
    check_hf_expressible(config, source)
    check_specs(config, specs, "tensors to convert")
    owner: dict[str, str] = {}  # transformers name -> the megaolmo tensor it is part of
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name in expected_shapes(config):
        shape, saved = specs[name]
        for hf_name, part in hf_tensors(config, name, torch.empty(shape, dtype=dtype or saved, device="meta")):
            owner[hf_name] = name
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
            name = owner[hf_name]
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
