"""`python -m megaolmo.convert` (from-hf, to-hf, from-olmo, consolidate) and megaolmo's consolidated checkpoints.

Every model here is tiny (d_model 64-96, 2-4 layers) and random, so the whole file runs in seconds on a CPU.
Conversions are checked bitwise on the tensors and against transformers' OlmoForCausalLM, Olmo2ForCausalLM and
Olmo3ForCausalLM on the logits (test_generations.py compares OLMo-2/3 with them in depth: losses, gradients).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from helpers import assert_ok
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_generations import DEFAULTS as GENERATION_DEFAULTS
from test_generations import FULL, SLIDING, YARN, random_hf_model

import megaolmo
from megaolmo.checkpoint import CheckpointError, load_consolidated, save_consolidated, write_consolidated
from megaolmo.checkpoint.consolidated import expected_shapes
from megaolmo.checkpoint.safetensors_stream import SafetensorsReader, save_file_order, write_safetensors
from megaolmo.checkpoint.sharded import save_final_weights
from megaolmo.config import ModelConfig, ParallelConfig
from megaolmo.convert import __main__ as convert
from megaolmo.convert import allenai_olmo
from megaolmo.convert import hf as hf_format
from megaolmo.model.engine import ParallelOLMo

SEQ = 16
BATCH = 2
HF_VOCAB = 1000  # not a multiple of 128
EOS = 999  # inside every vocabulary here, so transformers does not warn


# ---------------------------------------------------------------------------------------------
# Helpers


def run_cli(*argv: str | Path) -> subprocess.CompletedProcess:
    """`python -m megaolmo.convert ARGV` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "megaolmo.convert", *map(str, argv)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_main(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, str]:
    """`megaolmo.convert.main(ARGV)` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = convert.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `directory`; a name in two files is an error."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        part = load_file(str(file))
        assert not set(part) & set(tensors), f"{file.name} repeats tensors"
        tensors.update(part)
    return tensors


def input_ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype == torch.float32
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert scale > 0.1  # the weights are random, not zero
    assert err <= rel * scale, f"max |logit difference| {err:.3g} > {rel} * max |logit| {scale:.3g}"


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


@torch.no_grad()
def hf_logits(model: transformers.OlmoForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def our_logits(model: megaolmo.OLMo, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)


def hf_from_pretrained(directory: Path, cls: type = transformers.OlmoForCausalLM) -> transformers.PreTrainedModel:
    """Load as `cls` and insist that every tensor matched: nothing missing, unexpected or misshapen."""
    model, info = cls.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


def tmp_siblings(dst: Path) -> list[str]:
    """Leftover temporary directories of a write to `dst` (`.NAME.tmp-PID`)."""
    return sorted(p.name for p in dst.parent.glob(f".{dst.name}.tmp-*"))


def tiny_config(**overrides) -> ModelConfig:
    values = {
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_hidden_size": 96,
        "vocab_size": HF_VOCAB,
        "max_sequence_length": 64,
        "clip_qkv": 1.0,
        "eos_token_id": EOS,
        "pad_token_id": 1,
    }
    values.update(overrides)
    return ModelConfig(**values)


def random_model(config: ModelConfig, seed: int = 0) -> megaolmo.OLMo:
    """megaolmo's initialization; OLMo-2/3's norm weights (which start at one) then drawn from [0.5, 1.5]."""
    torch.manual_seed(seed)
    model = megaolmo.build_model(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name == "ln_f.weight":
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return model


# ---------------------------------------------------------------------------------------------
# Hugging Face models saved with save_pretrained

HF_CASES = {
    # num_key_value_heads < heads, clip_qkv that bites, separate lm_head, several shards plus an index.
    "untied-gqa-clip-sharded": {"tie": False, "kv_heads": 2, "clip_qkv": 0.5, "shard": "100KB"},
    "tied-mha": {"tie": True, "kv_heads": 4, "clip_qkv": None, "shard": None},
    "tied-mqa-clip": {"tie": True, "kv_heads": 1, "clip_qkv": 0.5, "shard": None},
}


@dataclasses.dataclass
class HFCase:
    name: str
    model: transformers.OlmoForCausalLM
    hf_dir: Path
    ckpt_dir: Path  # from-hf of hf_dir, written by convert.main
    sharded: bool


def save_hf_model(directory: Path, tie: bool, kv_heads: int, clip_qkv: float | None, shard: str | None, seed: int):
    """A random OlmoForCausalLM (weights std 0.15, so clip_qkv clamps and logits are O(1)), saved to `directory`."""
    hf_config = transformers.OlmoConfig(
        vocab_size=HF_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rope_theta=10000.0,
        clip_qkv=clip_qkv,
        tie_word_embeddings=tie,
        eos_token_id=EOS,
        pad_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.OlmoForCausalLM(hf_config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.15)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    if shard is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, max_shard_size=shard)
    return model


@pytest.fixture(scope="module", params=list(HF_CASES))
def hf_case(request, tmp_path_factory) -> HFCase:
    spec = HF_CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = save_hf_model(root / "hf", seed=list(HF_CASES).index(request.param), **spec)
    sharded = spec["shard"] is not None
    if sharded:  # the case must really exercise the index: several shards, no single file
        assert (root / "hf" / "model.safetensors.index.json").is_file()
        assert len(list((root / "hf").glob("model-*-of-*.safetensors"))) >= 3
        assert not (root / "hf" / "model.safetensors").exists()
    assert convert.main(["from-hf", str(root / "hf"), str(root / "ckpt")]) == 0
    return HFCase(request.param, model, root / "hf", root / "ckpt", sharded)


HF_CONFIG_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "clip_qkv",
    "tie_word_embeddings",
    "hidden_act",
    "attention_bias",
    "attention_dropout",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "rope_parameters",
)


def test_from_hf_then_to_hf_is_bitwise_identical(hf_case: HFCase, tmp_path: Path):
    out = tmp_path / "hf_again"
    assert convert.main(["to-hf", str(hf_case.ckpt_dir), str(out)]) == 0

    original, again = read_tensors(hf_case.hf_dir), read_tensors(out)
    if hf_case.model.config.tie_word_embeddings:
        assert "lm_head.weight" not in original  # save_pretrained drops the tied copy, and so does to-hf
    else:
        assert "lm_head.weight" in original
    assert len(original) == len(hf_case.model.state_dict()) - hf_case.model.config.tie_word_embeddings
    assert_same_state(again, original)

    # config.json: the same architecture, key by key, and the same OlmoConfig once transformers reads it.
    original_json = json.loads((hf_case.hf_dir / "config.json").read_text())
    again_json = json.loads((out / "config.json").read_text())
    for key in HF_CONFIG_KEYS:
        assert again_json[key] == original_json[key], key
    assert again_json["vocab_size"] == HF_VOCAB
    assert again_json.get("torch_dtype", again_json.get("dtype")) == "float32"
    original_config = transformers.OlmoConfig.from_pretrained(hf_case.hf_dir).to_dict()
    again_config = transformers.OlmoConfig.from_pretrained(out).to_dict()
    for config in (original_config, again_config):
        config.pop("transformers_version", None)
    assert again_config == original_config

    # transformers loads it with every key matched, and computes the same logits.
    reloaded = hf_from_pretrained(out)
    assert reloaded.dtype == torch.float32
    ids = input_ids(HF_VOCAB)
    assert_logits_close(hf_logits(reloaded, ids), hf_logits(hf_case.model, ids))


def test_from_hf_writes_consolidated_checkpoint(hf_case: HFCase):
    assert sorted(p.name for p in hf_case.ckpt_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert tmp_siblings(hf_case.ckpt_dir) == []
    header = json.loads((hf_case.ckpt_dir / "config.json").read_text())
    assert header["format"] == "megaolmo-consolidated"
    assert header["format_version"] == 1
    hf_config = hf_case.model.config
    config, state = load_consolidated(hf_case.ckpt_dir)
    assert header["model"] == config.to_dict()
    assert (config.d_model, config.n_layers, config.n_heads) == (64, 2, 4)
    assert config.kv_heads == hf_config.num_key_value_heads
    assert config.ffn_hidden_size == hf_config.intermediate_size
    assert config.clip_qkv == hf_config.clip_qkv
    assert config.weight_tying == hf_config.tie_word_embeddings
    assert config.padded_vocab_size == HF_VOCAB
    assert (config.eos_token_id, config.pad_token_id, config.max_sequence_length) == (EOS, 1, 64)

    # The fused tensors are [q | k | v] and [up | gate] (OLMO_REFERENCE.md, "Hugging Face mapping").
    hf_state = hf_case.model.state_dict()
    for i in range(2):
        hf_layer = f"model.layers.{i}"
        qkv = torch.cat([hf_state[f"{hf_layer}.self_attn.{p}_proj.weight"] for p in "qkv"])
        assert torch.equal(state[f"blocks.{i}.att_proj.linear.weight"], qkv)
        up_gate = torch.cat([hf_state[f"{hf_layer}.mlp.up_proj.weight"], hf_state[f"{hf_layer}.mlp.gate_proj.weight"]])
        assert torch.equal(state[f"blocks.{i}.ff_proj.linear.weight"], up_gate)
        assert torch.equal(state[f"blocks.{i}.attn_out.linear.weight"], hf_state[f"{hf_layer}.self_attn.o_proj.weight"])
        assert torch.equal(state[f"blocks.{i}.ff_out.linear.weight"], hf_state[f"{hf_layer}.mlp.down_proj.weight"])
    assert torch.equal(state["wte.weight"], hf_state["model.embed_tokens.weight"])
    assert ("head.linear.weight" in state) != config.weight_tying
    if not config.weight_tying:
        assert torch.equal(state["head.linear.weight"], hf_state["lm_head.weight"])


def test_load_matches_hf_logits(hf_case: HFCase):
    model = megaolmo.load(hf_case.ckpt_dir)
    assert isinstance(model, megaolmo.OLMo)
    assert not model.training and not any(m.training for m in model.modules())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    ids = input_ids(HF_VOCAB)
    assert ids.dtype == torch.int64
    logits = our_logits(model, ids)
    assert logits.shape == (BATCH, SEQ, model.config.padded_vocab_size)
    assert_logits_close(logits[..., :HF_VOCAB], hf_logits(hf_case.model, ids))

    half = megaolmo.load(hf_case.ckpt_dir, dtype=torch.bfloat16)
    assert not half.training
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_cli_from_hf_in_a_fresh_interpreter(sources: dict[str, Path], tmp_path: Path):
    src, dst = sources["hf_sharded"], tmp_path / "ckpt"
    result = run_cli("from-hf", src, dst)
    assert_ok(result)
    assert result.stdout.strip() == f"wrote {dst}"
    assert result.stderr == ""
    assert convert.main(["from-hf", str(src), str(tmp_path / "in-process")]) == 0
    config, state = load_consolidated(dst)
    expected_config, expected_state = load_consolidated(tmp_path / "in-process")
    assert config == expected_config
    assert_same_state(state, expected_state)
    assert (dst / "model.safetensors").read_bytes() == (tmp_path / "in-process" / "model.safetensors").read_bytes()


def test_from_hf_dtype_and_empty_output_dir(sources: dict[str, Path], tmp_path: Path, capsys):
    dst = tmp_path / "ckpt"
    dst.mkdir()  # an existing empty directory is an acceptable target
    code, out, err = run_main(capsys, "from-hf", sources["hf"], dst, "--dtype", "bfloat16")
    assert (code, err) == (0, "")
    assert out.strip() == f"wrote {dst}"
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    _, state = load_consolidated(dst)
    hf_state = load_file(str(sources["hf"] / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert torch.equal(state["wte.weight"], hf_state["model.embed_tokens.weight"].to(torch.bfloat16))
    assert torch.equal(state["head.linear.weight"], hf_state["lm_head.weight"].to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# OLMo-2 and OLMo-3 models saved with save_pretrained (test_generations.py's random transformers models)

GENERATION_CASES = {
    # GQA, hidden 96 over 6 heads, vocabulary 301, a separate lm_head, several shards plus an index, and an
    # initializer_range that is not the default.
    "olmo2-untied-gqa-sharded": {"arch": "olmo2", "shard": "100KB", "initializer_range": 0.01},
    # Tied, multi-head, YaRN with a beta that is not the default and no attention_factor.
    "olmo2-tied-mha-yarn": {
        "arch": "olmo2",
        "tie": True,
        "kv_heads": 6,
        "context": 64,
        "yarn": {**YARN, "beta_fast": 16.0},
    },
    # The default layer types (sliding but every fourth), YaRN on the full layers with an attention_factor.
    "olmo3-yarn-sharded": {
        "arch": "olmo3",
        "layers": 4,
        "window": 5,
        "context": 64,
        "yarn": {**YARN, "attention_factor": 1.2},
        "shard": "100KB",
    },
    # Explicit layer types, plain RoPE, multi-query attention.
    "olmo3-explicit-types": {"arch": "olmo3", "window": 6, "kv_heads": 1, "layer_types": [FULL, SLIDING, FULL]},
}
GENERATION_CLASSES = {
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
    "olmo3": (transformers.Olmo3Config, transformers.Olmo3ForCausalLM),
}


@dataclasses.dataclass
class GenerationCase:
    spec: dict
    model: transformers.PreTrainedModel
    hf_dir: Path
    ckpt_dir: Path  # from-hf of hf_dir


def save_generation_model(directory: Path, spec: dict, seed: int) -> transformers.PreTrainedModel:
    """test_generations' random transformers model of `spec`, saved with save_pretrained (sharded if asked)."""
    model = random_hf_model(spec, "sdpa", seed)
    model.config.initializer_range = spec.get("initializer_range", 0.02)
    if spec.get("shard") is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, max_shard_size=spec["shard"])
        assert (directory / "model.safetensors.index.json").is_file()
        assert len(list(directory.glob("model-*-of-*.safetensors"))) >= 3
        assert not (directory / "model.safetensors").exists()
    return model


@pytest.fixture(scope="module", params=list(GENERATION_CASES))
def generation_case(request, tmp_path_factory) -> GenerationCase:
    spec = {**GENERATION_DEFAULTS, **GENERATION_CASES[request.param]}
    root = tmp_path_factory.mktemp(request.param)
    model = save_generation_model(root / "hf", spec, seed=list(GENERATION_CASES).index(request.param))
    assert convert.main(["from-hf", str(root / "hf"), str(root / "ckpt")]) == 0
    return GenerationCase(spec, model, root / "hf", root / "ckpt")


def comparable(config: transformers.PretrainedConfig) -> dict:
    values = config.to_dict()
    values.pop("transformers_version", None)
    return values


def test_generation_from_hf_then_to_hf_is_identical(generation_case: GenerationCase, tmp_path: Path, capsys):
    spec, hf_model = generation_case.spec, generation_case.model
    config_class, model_class = GENERATION_CLASSES[spec["arch"]]
    out = tmp_path / "hf_again"
    sharding = ["--max-shard-gb", "0.0001"] if spec.get("shard") else []  # ~107 kB shards
    code, _, err = run_main(capsys, "to-hf", generation_case.ckpt_dir, out, *sharding)
    assert (code, err) == (0, "")
    assert (out / "model.safetensors.index.json").is_file() == bool(sharding)

    original, again = read_tensors(generation_case.hf_dir), read_tensors(out)
    assert len(original) == len(hf_model.state_dict()) - spec["tie"]  # a tied lm_head is not saved
    assert any(name.endswith("q_norm.weight") for name in original) and "model.norm.weight" in original
    assert_same_state(again, original)

    # config.json: the same class, and the same Olmo2Config / Olmo3Config once transformers reads it.
    again_json = json.loads((out / "config.json").read_text())
    assert again_json["architectures"] == [model_class.__name__]
    assert again_json["model_type"] == spec["arch"]
    assert comparable(config_class.from_pretrained(out)) == comparable(
        config_class.from_pretrained(generation_case.hf_dir)
    )

    # transformers loads it as the generation's class with every key matched, and computes the same logits.
    reloaded = hf_from_pretrained(out, model_class)
    assert type(reloaded) is model_class
    ids = input_ids(spec["vocab"])
    expected = hf_logits(hf_model, ids)
    assert_logits_close(hf_logits(reloaded, ids), expected)
    # ... as megaolmo does on the from-hf checkpoint (its own kernels: torch on the CPU).
    assert_logits_close(our_logits(megaolmo.load(generation_case.ckpt_dir), ids), expected)


def test_generation_from_hf_config(generation_case: GenerationCase):
    spec, hf_config = generation_case.spec, generation_case.model.config
    config, _ = load_consolidated(generation_case.ckpt_dir)
    assert config.arch == spec["arch"] and config.norm_after and config.qk_norm
    assert (config.d_model, config.n_layers, config.n_heads, config.kv_heads) == (
        96,
        spec["layers"],
        6,
        spec["kv_heads"],
    )
    assert (config.padded_vocab_size, config.weight_tying, config.clip_qkv) == (301, spec["tie"], None)
    assert (config.layer_norm_eps, config.rope_theta, config.init_std) == (
        1e-6,
        500000.0,
        spec.get("initializer_range", 0.02),
    )
    assert config.block_layer_types == list(getattr(hf_config, "layer_types", None) or [FULL] * spec["layers"])
    assert config.sliding_window == spec["window"]
    assert config.rope_scaling == (None if spec["yarn"] is None else "yarn")


def trimmed_config(hf_dir: Path, tmp_path: Path, *keys: str) -> Path:
    """A copy of `hf_dir` whose config.json leaves out `keys`, so that transformers takes its defaults."""
    copy = tmp_path / "trimmed"
    shutil.copytree(hf_dir, copy)
    values = json.loads((copy / "config.json").read_text())
    for key in keys:
        del values[key]
    (copy / "config.json").write_text(json.dumps(values))
    return copy


@pytest.mark.parametrize("arch", ["olmo2", "olmo3"])
def test_from_hf_takes_the_defaults_of_transformers(arch: str, tmp_path: Path, capsys):
    """A config.json that leaves out rms_norm_eps, RoPE, the window, layer types or initializer_range means
    what transformers makes of it (Olmo2Config: eps 1e-5, theta 10000; Olmo3Config: theta 500000, window 4096)."""
    spec = {**GENERATION_DEFAULTS, "arch": arch, "layers": 4, "window": 8 if arch == "olmo3" else None}
    save_generation_model(tmp_path / "hf", spec, seed=11)
    keys = ["rms_norm_eps", "rope_parameters", "initializer_range"] + (
        ["sliding_window", "layer_types"] * (arch == "olmo3")
    )
    src = trimmed_config(tmp_path / "hf", tmp_path, *keys)
    code, _, err = run_main(capsys, "from-hf", src, tmp_path / "ckpt")
    assert (code, err) == (0, "")
    config, _ = load_consolidated(tmp_path / "ckpt")
    config_class, model_class = GENERATION_CLASSES[arch]
    hf_config = config_class.from_pretrained(src)
    assert config.layer_norm_eps == hf_config.rms_norm_eps == 1e-5
    rope = hf_config.rope_parameters[FULL] if arch == "olmo3" else hf_config.rope_parameters
    assert config.rope_theta == rope["rope_theta"] == {"olmo2": 10000.0, "olmo3": 500000.0}[arch]
    assert config.init_std == hf_config.initializer_range == 0.02
    if arch == "olmo3":
        assert config.sliding_window == hf_config.sliding_window == 4096
        assert config.block_layer_types == hf_config.layer_types == [SLIDING, SLIDING, SLIDING, FULL]
    ids = input_ids(spec["vocab"])
    assert_logits_close(
        our_logits(megaolmo.load(tmp_path / "ckpt"), ids), hf_logits(hf_from_pretrained(src, model_class), ids)
    )


# ---------------------------------------------------------------------------------------------
# to-hf from a checkpoint that megaolmo wrote itself


@pytest.fixture(scope="module", params=["tied", "untied"])
def our_ckpt(request, tmp_path_factory) -> tuple[Path, megaolmo.OLMo]:
    config = tiny_config(weight_tying=request.param == "tied")
    assert config.padded_vocab_size == 1024  # vocab 1000 padded to a multiple of 128
    model = random_model(config, seed=3)
    path = tmp_path_factory.mktemp(f"ours-{request.param}") / "ckpt"
    save_consolidated(path, config, model.state_dict())
    return path, model


def test_to_hf_from_megaolmo_checkpoint(our_ckpt, tmp_path: Path, capsys):
    ckpt, model = our_ckpt
    config = model.config
    hf_dir = tmp_path / "hf"
    code, out, err = run_main(capsys, "to-hf", ckpt, hf_dir)
    assert (code, err) == (0, "")
    assert out.strip() == f"wrote {hf_dir}"
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert tmp_siblings(hf_dir) == []

    hf_json = json.loads((hf_dir / "config.json").read_text())
    assert hf_json["model_type"] == "olmo"
    assert hf_json["architectures"] == ["OlmoForCausalLM"]
    assert hf_json["vocab_size"] == 1024
    assert hf_json["intermediate_size"] == 96
    assert hf_json["num_key_value_heads"] == 2
    assert hf_json["clip_qkv"] == 1.0
    assert hf_json["tie_word_embeddings"] == config.weight_tying
    assert hf_json["torch_dtype"] == "float32"

    tensors = read_tensors(hf_dir)
    assert ("lm_head.weight" in tensors) != config.weight_tying
    assert all(t.dtype == torch.float32 for t in tensors.values())

    hf = hf_from_pretrained(hf_dir)
    assert hf.config.vocab_size == 1024
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == config.weight_tying
    ids = input_ids(config.vocab_size)
    ours = our_logits(model, ids)
    assert ours.shape == (BATCH, SEQ, 1024)
    assert_logits_close(hf_logits(hf, ids), ours)
    assert_logits_close(our_logits(megaolmo.load(ckpt), ids), ours)

    # ... and from-hf brings back the very same tensors.
    back = tmp_path / "back"
    assert convert.main(["from-hf", str(hf_dir), str(back)]) == 0
    back_config, back_state = load_consolidated(back)
    assert_same_state(back_state, dict(model.state_dict()))
    assert back_config.padded_vocab_size == config.padded_vocab_size
    assert dataclasses.replace(back_config, vocab_size=1000, embedding_size=None) == config


def test_to_hf_bfloat16(our_ckpt, tmp_path: Path, capsys):
    ckpt, model = our_ckpt
    hf_dir = tmp_path / "hf"
    code, _, err = run_main(capsys, "to-hf", ckpt, hf_dir, "--dtype", "bfloat16")
    assert (code, err) == (0, "")
    assert json.loads((hf_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = read_tensors(hf_dir)
    expected = hf_format.state_to_hf(model.config, model.state_dict())
    if model.config.weight_tying:
        expected.pop("lm_head.weight")
    assert_same_state(tensors, {name: t.to(torch.bfloat16) for name, t in expected.items()})

    hf = hf_from_pretrained(hf_dir)
    assert hf.dtype == torch.bfloat16
    ids = input_ids(model.config.vocab_size)
    reference = our_logits(megaolmo.load(ckpt, dtype=torch.bfloat16), ids).float()
    # Both run in bf16; allow for rounding that differs between the two implementations.
    assert (hf_logits(hf, ids).float() - reference).abs().max() <= 0.02 * reference.abs().max()


def test_to_hf_sharded(our_ckpt, tmp_path: Path, capsys):
    ckpt, model = our_ckpt
    hf_dir = tmp_path / "hf"
    code, _, err = run_main(capsys, "to-hf", ckpt, hf_dir, "--max-shard-gb", "0.0001")  # ~107 kB shards
    assert (code, err) == (0, "")
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(hf_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert not (hf_dir / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    for shard in shards:
        assert shard.stat().st_size <= 0.0001 * 2**30 or len(load_file(str(shard))) == 1
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                assert index["weight_map"][name] == shard.name
    tensors = read_tensors(hf_dir)
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())

    hf = hf_from_pretrained(hf_dir)
    ids = input_ids(model.config.vocab_size)
    assert_logits_close(hf_logits(hf, ids), our_logits(model, ids))


# ---------------------------------------------------------------------------------------------
# consolidate and to-hf stream: one megaolmo tensor in memory at a time, the same files as in memory

QKV_SPLITTING_SHARD_GB = "0.000013"  # ~13.6 kB: the tiny model's q, k and v fall into different shards


def in_memory_hf(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None):
    """What to-hf wrote before it streamed: state_to_hf of the whole (cast) state, less a tied lm_head."""
    hf = hf_format.state_to_hf(config, {name: t.to(dtype or t.dtype) for name, t in state.items()})
    if config.weight_tying:
        hf.pop("lm_head.weight")
    return hf


def in_memory_weight_map(hf: dict[str, torch.Tensor], max_shard_bytes: int) -> dict[str, str]:
    """The shards to-hf planned before it streamed: state_to_hf's order, a new shard past max_shard_bytes."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in hf.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return {
        name: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, shard in enumerate(shards) for name in shard
    }


def assert_hf_dir_holds(hf_dir: Path, expected: dict[str, torch.Tensor], shard_gb: str | None) -> None:
    """`hf_dir` holds exactly `expected`, sharded (and indexed) as the in-memory to-hf did it."""
    assert_same_state(read_tensors(hf_dir), expected)
    if shard_gb is None:
        assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "model.safetensors"]
        return
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == in_memory_weight_map(expected, int(float(shard_gb) * 2**30))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    for shard in set(index["weight_map"].values()):
        assert_same_state(
            load_file(str(hf_dir / shard)), {n: expected[n] for n, f in index["weight_map"].items() if f == shard}
        )
    qkv_shards = [{index["weight_map"][f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"} for i in range(2)]
    assert any(len(shards) > 1 for shards in qkv_shards), qkv_shards  # a fused tensor's parts cross shards


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_consolidate_streams_the_file_save_file_writes(our_ckpt, dtype: str | None, tmp_path: Path, capsys):
    ckpt, model = our_ckpt
    dst = tmp_path / "ckpt"
    code, out, err = run_main(capsys, "consolidate", ckpt, dst, *(["--dtype", dtype] if dtype else []))
    assert (code, out.strip(), err) == (0, f"wrote {dst}", "")
    state = {name: t.to(convert.DTYPES.get(dtype, t.dtype)) for name, t in model.state_dict().items()}
    config, loaded = load_consolidated(dst)
    assert config == model.config
    assert_same_state(loaded, state)
    # Byte for byte the file safetensors' save_file makes of the whole state: the one the in-memory writer made.
    save_file(state, str(tmp_path / "whole.safetensors"), metadata={"format": "pt"})
    assert (dst / "model.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


@pytest.mark.parametrize("shard_gb", [None, QKV_SPLITTING_SHARD_GB])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_to_hf_streams_what_state_to_hf_gives(our_ckpt, dtype: str | None, shard_gb: str | None, tmp_path, capsys):
    ckpt, model = our_ckpt
    hf_dir = tmp_path / "hf"
    argv = [
        "to-hf",
        ckpt,
        hf_dir,
        *(["--dtype", dtype] if dtype else []),
        *(["--max-shard-gb", shard_gb] if shard_gb else []),
    ]
    code, _, err = run_main(capsys, *argv)
    assert (code, err) == (0, "")
    expected = in_memory_hf(model.config, dict(model.state_dict()), convert.DTYPES.get(dtype))
    assert_hf_dir_holds(hf_dir, expected, shard_gb)
    hf_json = json.loads((hf_dir / "config.json").read_text())
    assert hf_json == hf_format.config_to_hf(model.config, convert.DTYPES.get(dtype, torch.float32))


@pytest.fixture(scope="module")
def final_weights(tmp_path_factory) -> tuple[Path, ModelConfig, dict[str, torch.Tensor]]:
    """A run's final weights, sharded as training writes them, and the model's own unsharded tensors."""
    model = ParallelOLMo(tiny_config(weight_tying=False), ParallelConfig(), seed=0)
    path = save_final_weights(tmp_path_factory.mktemp("final") / "weights", model, step=1)
    return path, model.config, model.full_tensors()


def test_consolidate_and_to_hf_stream_sharded_weights(final_weights, tmp_path: Path, capsys):
    src, config, state = final_weights
    assert (src / "trainer_state.json").is_file() and not (src / "model.safetensors").exists()
    for dtype in (None, "bfloat16"):
        dst = tmp_path / f"ckpt-{dtype}"
        code, _, err = run_main(capsys, "consolidate", src, dst, *(["--dtype", dtype] if dtype else []))
        assert (code, err) == (0, "")
        loaded_config, loaded = load_consolidated(dst)
        assert loaded_config == config
        assert_same_state(loaded, {name: t.to(convert.DTYPES.get(dtype, t.dtype)) for name, t in state.items()})

    hf_dir = tmp_path / "hf"
    code, _, err = run_main(
        capsys, "to-hf", src, hf_dir, "--dtype", "bfloat16", "--max-shard-gb", QKV_SPLITTING_SHARD_GB
    )
    assert (code, err) == (0, "")
    assert_hf_dir_holds(hf_dir, in_memory_hf(config, state, torch.bfloat16), QKV_SPLITTING_SHARD_GB)
    # The same directory, byte for byte, whether to-hf reads the sharded weights or their consolidation.
    again = tmp_path / "hf-again"
    assert convert.main(["to-hf", str(tmp_path / "ckpt-None"), str(again), "--dtype", "bfloat16",
                         "--max-shard-gb", QKV_SPLITTING_SHARD_GB]) == 0  # fmt: skip
    assert {p.name: p.read_bytes() for p in again.iterdir()} == {p.name: p.read_bytes() for p in hf_dir.iterdir()}


# Conversions in a fresh interpreter: prints, as JSON, the peak resident memory each added, in bytes. Each runs
# twice and the second run is measured: the first pages in the code it runs, which RSS counts as well.
MEMORY_PROBE = """
import json, sys
from pathlib import Path
from megaolmo.checkpoint import load_state_dict, save_consolidated
from megaolmo.convert import __main__ as convert

def status_kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

def run(mode, options, dst):
    if mode == "whole":  # the whole state_dict in memory, as consolidate held it before it streamed
        config, state = load_state_dict(src)
        save_consolidated(dst, config, state)
    else:
        assert convert.main([mode, src, str(dst), *options]) == 0

src, out, runs = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
peaks = {}
for name, (mode, *options) in runs.items():
    run(mode, options, out / name / "warm-up")
    rss = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
    run(mode, options, out / name / "measured")
    peaks[name] = (status_kib("VmHWM") - rss) * 1024
print(json.dumps(peaks))
"""


@pytest.fixture(scope="module")
def deep_ckpt(tmp_path_factory) -> tuple[Path, int, int]:
    """A consolidated checkpoint of many layers of small tensors: (path, largest tensor, total), in bytes."""
    config = ModelConfig(d_model=512, n_layers=5, n_heads=8, ffn_hidden_size=2048, vocab_size=1024, weight_tying=False)
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) for name, shape in expected_shapes(config).items()}
    path = tmp_path_factory.mktemp("deep") / "ckpt"
    save_consolidated(path, config, state)
    sizes = [t.numel() * t.element_size() for t in state.values()]
    return path, max(sizes), sum(sizes)


def test_conversions_hold_one_tensor_at_a_time(deep_ckpt, tmp_path: Path):
    src, largest, total = deep_ckpt
    assert total >= 8 * largest and largest == 8 * 2**20
    runs = {
        "consolidate": ["consolidate"],
        "consolidate-bf16": ["consolidate", "--dtype", "bfloat16"],
        "to-hf-sharded": ["to-hf", "--max-shard-gb", "0.01"],
        "to-hf-bf16": ["to-hf", "--dtype", "bfloat16"],
        "whole": ["whole"],
    }
    # glibc serves allocations below its dynamic mmap threshold (up to 32 MB) from a heap that it trims only
    # now and then; a 65B model's tensors are far above it, each mapped and unmapped on its own. Pinning the
    # threshold low gives these 8 MB tensors the same treatment, so RSS counts the tensors held, not heap
    # slack, and one run's freed memory does not hide the next one's.
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(src), str(tmp_path), json.dumps(runs)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        check=False,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    peaks = json.loads(probe.stdout.splitlines()[-1])
    in_largest = {name: round(peak / largest, 2) for name, peak in peaks.items()}
    assert peaks["whole"] >= 0.95 * total, in_largest  # the measurement sees a whole model held in memory
    for name, peak in peaks.items():
        if name != "whole":
            assert peak <= 2.5 * largest, in_largest  # measured: 1.0 (fp32), 1.5 (reading fp32 for bf16)


# ---------------------------------------------------------------------------------------------
# megaolmo.checkpoint on its own


def test_save_and_load_consolidated(tmp_path: Path):
    config = tiny_config(weight_tying=False)
    model = random_model(config)
    for dtype in (torch.float32, torch.bfloat16):
        state = {name: t.to(dtype) for name, t in model.state_dict().items()}
        path = tmp_path / str(dtype)
        save_consolidated(path, config, state)
        header = json.loads((path / "config.json").read_text())
        assert header == {"format": "megaolmo-consolidated", "format_version": 1, "model": config.to_dict()}
        loaded_config, loaded = load_consolidated(path)
        assert loaded_config == config
        assert_same_state(loaded, state)
        assert all(t.device.type == "cpu" for t in loaded.values())
        assert megaolmo.load(path).wte.weight.dtype == dtype  # the checkpoint's dtype unless asked otherwise
    assert tmp_siblings(tmp_path / str(torch.float32)) == []


def test_save_consolidated_refuses_a_bad_state(tmp_path: Path):
    config = tiny_config()
    state = dict(random_model(config).state_dict())
    missing = {k: v for k, v in state.items() if k != "blocks.1.ff_out.linear.weight"}
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ff_out\.linear\.weight is missing"):
        save_consolidated(tmp_path / "a", config, missing)
    misshapen = {**state, "wte.weight": torch.zeros(1000, 64)}
    with pytest.raises(CheckpointError, match=r"wte\.weight has shape \(1000, 64\).*\(1024, 64\)"):
        save_consolidated(tmp_path / "b", config, misshapen)
    extra = {**state, "head.linear.weight": torch.zeros(1024, 64)}  # tied: there is no head
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['head\.linear\.weight'\]"):
        save_consolidated(tmp_path / "c", config, extra)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path: Path):
    config = tiny_config()
    state = random_model(config).state_dict()
    specs = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}

    def read(name: str) -> torch.Tensor:  # the disk fills up halfway through model.safetensors
        if name == "blocks.1.att_proj.linear.weight":
            raise OSError("No space left on device")
        return state[name]

    dst = tmp_path / "ckpt"
    with pytest.raises(OSError, match="No space left"):
        write_consolidated(dst, config, specs, read)
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtypes", [["float32"], ["bfloat16"], ["float16"], ["float32", "bfloat16", "float16"]])
def test_streamed_safetensors_read_back_exactly(dtypes: list[str], tmp_path: Path):
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (3,), (), (0, 4), (2, 3, 4)]
    tensors = {
        f"{dtype}.{i}": (torch.randn(shape, generator=generator) * 100).to(convert.DTYPES[dtype])
        for dtype in dtypes
        for i, shape in enumerate(shapes)
    }
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    reference = tmp_path / "save_file.safetensors"
    save_file(tensors, str(reference), metadata={"format": "pt"})
    # In save_file's order (widest dtype first, then by name), the bytes are save_file's own.
    write_safetensors(tmp_path / "sorted.safetensors", save_file_order(specs), tensors.__getitem__)
    assert (tmp_path / "sorted.safetensors").read_bytes() == reference.read_bytes()
    # In any other order (to-hf stores a model's order) safetensors reads it back just as well.
    reverse = dict(reversed(specs.items()))
    write_safetensors(tmp_path / "reverse.safetensors", reverse, tensors.__getitem__)
    assert_same_state(load_file(str(tmp_path / "reverse.safetensors")), tensors)
    with safe_open(str(tmp_path / "reverse.safetensors"), framework="pt") as handle:
        assert handle.offset_keys() == list(reverse)
        assert handle.metadata() == {"format": "pt"}
        assert_same_state({name: handle.get_tensor(name) for name in reverse}, tensors)
    # ... and so does megaolmo's reader, one tensor at a time, of either file.
    for file in (reference, tmp_path / "reverse.safetensors"):
        reader = SafetensorsReader(file)
        assert reader.specs == specs
        assert_same_state({name: reader.read(name) for name in reader.specs}, tensors)


def test_load_errors(tmp_path: Path, sources: dict[str, Path]):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        megaolmo.load(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        megaolmo.load(tmp_path)
    with pytest.raises(CheckpointError, match="from-hf"):
        megaolmo.load(sources["hf"])

    copy = tmp_path / "copy"
    shutil.copytree(sources["ckpt"], copy)
    header = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**header, "format_version": 2}))
    with pytest.raises(CheckpointError, match="format_version=2"):
        megaolmo.load(copy)
    (copy / "config.json").write_text(json.dumps({**header, "model": {**header["model"], "n_experts": 8}}))
    with pytest.raises(CheckpointError, match="n_experts"):
        megaolmo.load(copy)
    (copy / "config.json").write_text(json.dumps(header))
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        megaolmo.load(copy)


# ---------------------------------------------------------------------------------------------
# from-olmo: allenai/OLMo unsharded checkpoints


def olmo_name(name: str) -> str:
    """allenai/OLMo's name of a megaolmo tensor (written independently of allenai_olmo._name_to_olmo)."""
    if name == "wte.weight":
        return "transformer.wte.weight"
    if name == "head.linear.weight":
        return "transformer.ff_out.weight"
    if name == "ln_f.weight" or name.endswith(("attn_norm.weight", "ff_norm.weight", "q_norm.weight", "k_norm.weight")):
        assert name == "ln_f.weight" or name.startswith("blocks."), name
        return "transformer." + name  # OLMo-2's norms: transformer.ln_f, transformer.blocks.{i}.attn_norm, ...
    assert name.startswith("blocks.") and name.endswith(".linear.weight"), name
    return "transformer." + name.removesuffix(".linear.weight") + ".weight"


def olmo_safetensors_key(name: str) -> str:
    """OLMo's safetensors key encoding (olmo/safetensors_util.py): base64(pickle((keys, value_is_pickled)))."""
    return base64.urlsafe_b64encode(pickle.dumps(((name,), False))).decode("ascii")


# The model: keys of an OLMo-2 config.yaml (allenai/OLMo's configs/official-1124/OLMo-2-1124-7B.yaml).
OLMO2_OPTIONS = {
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "attention_layer_norm": True,
    "attention_layer_norm_with_affine": True,
    "norm_after": True,
    "layer_norm_eps": 1e-6,
    "rope_theta": 500000.0,
    "init_fn": "normal",
    "init_std": 0.02,
    "weight_tying": False,
}

OLMO_CASES = {
    # model.pt, separate head, GQA, mlp_hidden_size, clip_qkv; run through a fresh interpreter.
    "pt-untied-gqa": {
        "weights": "pt",
        "cli": True,
        "config": tiny_config(weight_tying=False, n_kv_heads=2, clip_qkv=1.0, rope_theta=500000.0, embedding_size=1024),
        "model_yaml": {
            "n_kv_heads": 2,
            "mlp_hidden_size": 192,
            "embedding_size": 1024,
            "clip_qkv": 1.0,
            "rope_theta": 500000.0,
        },
    },
    # model.safetensors with encoded keys, tied, multi-query attention, mlp_ratio, no embedding_size.
    "safetensors-tied-mqa": {
        "weights": "safetensors",
        "cli": False,
        "config": tiny_config(weight_tying=True, n_kv_heads=1, ffn_hidden_size=128, clip_qkv=None, embedding_size=1000),
        "model_yaml": {"multi_query_attention": True, "n_kv_heads": None, "mlp_ratio": 4, "clip_qkv": None},
    },
    # OLMo-2's options: safetensors with encoded keys, separate head, GQA, weights for every norm.
    "olmo2-safetensors-untied-gqa": {
        "weights": "safetensors",
        "cli": False,
        "config": tiny_config(
            arch="olmo2",
            weight_tying=False,
            clip_qkv=None,
            layer_norm_eps=1e-6,
            rope_theta=500000.0,
            embedding_size=1000,
        ),
        "model_yaml": {**OLMO2_OPTIONS, "n_kv_heads": 2, "mlp_hidden_size": 192},
    },
    # OLMo-2's options with amd_compatible_rms and attention_layer_norm_with_affine left out (OLMo's default,
    # true), tied, multi-head, another init_std; model.pt.
    "olmo2-pt-tied-amd-rms": {
        "weights": "pt",
        "cli": False,
        "config": tiny_config(
            arch="olmo2",
            n_kv_heads=4,
            clip_qkv=None,
            layer_norm_eps=1e-6,
            rope_theta=500000.0,
            init_std=0.01,
            embedding_size=1024,
        ),
        "model_yaml": {
            **{k: v for k, v in OLMO2_OPTIONS.items() if k != "attention_layer_norm_with_affine"},
            "layer_norm_type": "amd_compatible_rms",
            "weight_tying": True,
            "init_std": 0.01,
            "mlp_hidden_size": 192,
            "embedding_size": 1024,
        },
    },
}


def olmo_model_yaml(config: ModelConfig, **overrides) -> dict:
    """The `model:` section of an allenai/OLMo config.yaml for `config` (OLMo's keys, OLMo-1 features unless
    `overrides` give OLMo2_OPTIONS)."""
    section = {
        "d_model": config.d_model,
        "n_heads": config.n_heads,
        "n_layers": config.n_layers,
        "vocab_size": config.vocab_size,
        "max_sequence_length": config.max_sequence_length,
        "weight_tying": config.weight_tying,
        "layer_norm_type": "default",
        "layer_norm_with_affine": False,
        "layer_norm_eps": 1e-5,
        "bias_for_layer_norm": None,
        "attention_layer_norm": False,
        "include_bias": False,
        "block_type": "sequential",
        "activation_type": "swiglu",
        "alibi": False,
        "rope": True,
        "rope_full_precision": True,
        "flash_attention": False,
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "embedding_dropout": 0.0,
        "init_device": "meta",
        "init_fn": "mitchell",
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    section.update(overrides)
    return section


def write_olmo_dir(directory: Path, model_yaml: dict, state: dict[str, torch.Tensor], weights: str) -> None:
    directory.mkdir(parents=True)
    config_yaml = {
        "run_name": "tiny-olmo",
        "seed": 6198,
        "model": model_yaml,
        "optimizer": {"name": "adamw", "learning_rate": 4.0e-4, "betas": [0.9, 0.95]},
        "max_duration": "739_328",
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config_yaml, sort_keys=False))
    olmo_state = {olmo_name(name): t.clone() for name, t in state.items()}
    if weights == "pt":
        torch.save(olmo_state, directory / "model.pt")
    else:
        save_file(
            {olmo_safetensors_key(name): t for name, t in olmo_state.items()}, str(directory / "model.safetensors")
        )


@pytest.fixture(scope="module")
def olmo_dir(tmp_path_factory) -> Path:
    """A valid OLMo checkpoint (model.pt) that the bad-input cases copy and break."""
    case = OLMO_CASES["pt-untied-gqa"]
    path = tmp_path_factory.mktemp("olmo") / "olmo"
    write_olmo_dir(
        path, olmo_model_yaml(case["config"], **case["model_yaml"]), random_model(case["config"]).state_dict(), "pt"
    )
    return path


def test_olmo_names_invert_the_converter():
    for arch in ("olmo1", "olmo2"):
        state = random_model(tiny_config(arch=arch, weight_tying=False)).state_dict()
        assert {allenai_olmo._name_to_olmo(name) for name in state} == {olmo_name(name) for name in state}
    assert olmo_name("blocks.1.att_proj.linear.weight") == "transformer.blocks.1.att_proj.weight"
    assert olmo_name("blocks.1.q_norm.weight") == "transformer.blocks.1.q_norm.weight"
    assert olmo_name("blocks.0.ff_norm.weight") == "transformer.blocks.0.ff_norm.weight"
    assert olmo_name("ln_f.weight") == "transformer.ln_f.weight"
    key = olmo_safetensors_key("transformer.wte.weight")
    assert "." not in key
    assert allenai_olmo._olmo_key(key) == "transformer.wte.weight"


@pytest.mark.parametrize("case", list(OLMO_CASES))
def test_from_olmo(case: str, tmp_path: Path, capsys):
    spec = OLMO_CASES[case]
    config: ModelConfig = spec["config"]
    model = random_model(config, seed=5)
    src, dst = tmp_path / "olmo", tmp_path / "ckpt"
    write_olmo_dir(src, olmo_model_yaml(config, **spec["model_yaml"]), model.state_dict(), spec["weights"])
    assert sorted(p.name for p in src.iterdir()) == sorted(["config.yaml", f"model.{spec['weights']}"])

    if spec["cli"]:
        result = run_cli("from-olmo", src, dst)
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        code, out, err = run_main(capsys, "from-olmo", src, dst)
    assert (code, err) == (0, "")
    assert out.strip() == f"wrote {dst}"

    loaded_config, state = load_consolidated(dst)
    assert loaded_config == config
    assert_same_state(state, dict(model.state_dict()))
    ids = input_ids(config.vocab_size)
    assert_logits_close(our_logits(megaolmo.load(dst), ids), our_logits(model, ids))
    if config.arch == "olmo1":
        return
    # OLMo-2: every norm has its weight (not all ones), and to-hf makes an Olmo2ForCausalLM that agrees.
    norms = [name for name in state if name.endswith("norm.weight") or name == "ln_f.weight"]
    assert len(norms) == 4 * config.n_layers + 1
    assert all(not torch.equal(state[name], torch.ones_like(state[name])) for name in norms)
    code, _, err = run_main(capsys, "to-hf", dst, tmp_path / "hf")
    assert (code, err) == (0, "")
    hf = hf_from_pretrained(tmp_path / "hf", transformers.Olmo2ForCausalLM)
    assert_logits_close(hf_logits(hf, ids), our_logits(model, ids))


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, one "error:" line that names the fault, nothing written


@pytest.fixture(scope="module")
def sources(tmp_path_factory, olmo_dir: Path) -> dict[str, Path]:
    """Valid inputs of every kind, never modified: cases copy them before breaking them."""
    root = tmp_path_factory.mktemp("sources")
    save_hf_model(root / "hf", tie=False, kv_heads=2, clip_qkv=None, shard=None, seed=7)
    save_hf_model(root / "hf_sharded", tie=True, kv_heads=4, clip_qkv=None, shard="100KB", seed=8)
    config = tiny_config()
    save_consolidated(root / "ckpt", config, random_model(config).state_dict())
    paths = {"hf": root / "hf", "hf_sharded": root / "hf_sharded", "ckpt": root / "ckpt", "olmo": olmo_dir}
    for arch in ("olmo2", "olmo3"):
        spec = {**GENERATION_DEFAULTS, "arch": arch, "window": 5 if arch == "olmo3" else None}
        save_generation_model(root / f"hf_{arch}", spec, seed=9)
        paths[f"hf_{arch}"] = root / f"hf_{arch}"
    # Models that the transformers classes cannot express: OLMo-2 with clip_qkv, OLMo-1 with another epsilon.
    for name, config in {
        "ckpt_olmo2_clip": tiny_config(arch="olmo2", clip_qkv=0.5),
        "ckpt_olmo1_eps": tiny_config(layer_norm_eps=1e-6),
    }.items():
        save_consolidated(root / name, config, random_model(config).state_dict())
        paths[name] = root / name
    return paths


@dataclasses.dataclass
class BadInput:
    argv: list  # convert's arguments; the output directory is appended
    needles: tuple[str, ...]  # what the error line must contain
    dst: Path | None = None  # the output directory, when the case creates it itself


def copy_of(sources: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"src-{kind}"
    shutil.copytree(sources[kind], path)
    return path


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_olmo_model(directory: Path, **changes) -> None:
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config["model"].update(changes)
    (directory / "config.yaml").write_text(yaml.safe_dump(config))


def missing_source(command: str) -> Callable[[dict, Path], BadInput]:
    def case(sources, tmp_path):
        return BadInput([command, tmp_path / "no-such-dir"], ("no-such-dir", "does not exist"))

    return case


def model_type(value: str) -> Callable[[dict, Path], BadInput]:
    def case(sources, tmp_path):
        src = copy_of(sources, "hf", tmp_path)
        edit_json(src / "config.json", model_type=value)
        return BadInput(["from-hf", src], ("config.json", f"model_type={value!r}"))

    return case


def shape_mismatch(sources, tmp_path):
    src = copy_of(sources, "hf", tmp_path)
    edit_json(src / "config.json", intermediate_size=128)  # the tensors are 96 wide
    return BadInput(["from-hf", src], ("model.layers.0.mlp.up_proj.weight", "(96, 64)", "(128, 64)"))


def missing_shard(sources, tmp_path):
    src = copy_of(sources, "hf_sharded", tmp_path)
    shard = sorted(src.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    return BadInput(["from-hf", src], (shard.name, "model.safetensors.index.json", "missing"))


def missing_tensor(sources, tmp_path):
    src = copy_of(sources, "hf", tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    return BadInput(["from-hf", src], ("model.layers.1.self_attn.k_proj.weight", "missing"))


def unexpected_tensor(sources, tmp_path):
    src = copy_of(sources, "hf", tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(64)  # an OLMo-2 tensor
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    return BadInput(["from-hf", src], ("unexpected", "model.layers.0.self_attn.q_norm.weight"))


def edit_rope(kind: str, rope: dict, needles: tuple[str, ...]) -> Callable[[dict, Path], BadInput]:
    """A copy of hf_{kind} whose config.json has `rope` merged into rope_parameters (OLMo-3: into its entry
    named by rope's one key, full_attention or sliding_attention)."""

    def case(sources, tmp_path):
        src = copy_of(sources, f"hf_{kind}", tmp_path)
        values = json.loads((src / "config.json").read_text())
        if kind == "olmo3":
            ((layer_type, entry),) = rope.items()
            values["rope_parameters"][layer_type].update(entry)
        else:
            values["rope_parameters"].update(rope)
        (src / "config.json").write_text(json.dumps(values))
        return BadInput(["from-hf", src], ("config.json", *needles))

    return case


def invalid_json(sources, tmp_path):
    src = copy_of(sources, "hf", tmp_path)
    (src / "config.json").write_text('{"model_type": "olmo",')
    return BadInput(["from-hf", src], ("config.json", "not valid JSON"))


def output_not_empty(command: str, kind: str) -> Callable[[dict, Path], BadInput]:
    def case(sources, tmp_path):
        dst = tmp_path / "out"
        dst.mkdir()
        (dst / "keep.txt").write_text("precious\n")
        return BadInput([command, sources[kind]], (str(dst), "not empty"), dst=dst)

    return case


def output_is_a_file(sources, tmp_path):
    dst = tmp_path / "out"
    dst.write_text("precious\n")
    return BadInput(["from-olmo", sources["olmo"]], (str(dst), "already exists"), dst=dst)


def to_hf_on_hf_dir(sources, tmp_path):
    return BadInput(["to-hf", sources["hf"]], (str(sources["hf"]), "not a megaolmo checkpoint", "from-hf"))


def to_hf_incomplete(sources, tmp_path):
    src = copy_of(sources, "ckpt", tmp_path)
    (src / "model.safetensors").unlink()
    return BadInput(["to-hf", src], ("model.safetensors is missing",))


def consolidate_truncated(sources, tmp_path):
    src = copy_of(sources, "ckpt", tmp_path)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return BadInput(["consolidate", src], (str(weights), "not a readable safetensors file"))


def olmo_unsupported(key: str, value) -> Callable[[dict, Path], BadInput]:
    def case(sources, tmp_path):
        src = copy_of(sources, "olmo", tmp_path)
        edit_olmo_model(src, **{key: value})
        return BadInput(["from-olmo", src], ("config.yaml", f"model.{key}={value!r}", "not supported"))

    return case


def olmo2_options_but(key: str, value) -> Callable[[dict, Path], BadInput]:
    """OLMo-2's options with one of them as OLMo-1 has it: a mixture, refused naming that key."""

    def case(sources, tmp_path):
        src = copy_of(sources, "olmo", tmp_path)
        edit_olmo_model(src, **{**OLMO2_OPTIONS, key: value})
        return BadInput(["from-olmo", src], ("config.yaml", f"model.{key}={value!r}", "OLMo-2"))

    return case


def to_hf_inexpressible(kind: str, needles: tuple[str, ...]) -> Callable[[dict, Path], BadInput]:
    def case(sources, tmp_path):
        return BadInput(["to-hf", sources[kind]], (str(sources[kind]), "cannot be converted", *needles))

    return case


def olmo_missing_tensor(sources, tmp_path):
    src = copy_of(sources, "olmo", tmp_path)
    state = torch.load(src / "model.pt", weights_only=True)
    del state["transformer.ff_out.weight"]
    torch.save(state, src / "model.pt")
    return BadInput(["from-olmo", src], ("transformer.ff_out.weight", "missing"))


def olmo_no_weights(sources, tmp_path):
    src = copy_of(sources, "olmo", tmp_path)
    (src / "model.pt").unlink()
    return BadInput(["from-olmo", src], ("neither model.pt nor model.safetensors",))


# (case, run through a fresh interpreter?)
BAD_INPUTS = {
    "from-hf-missing-source": (missing_source("from-hf"), True),
    "to-hf-missing-source": (missing_source("to-hf"), False),
    "from-olmo-missing-source": (missing_source("from-olmo"), False),
    "model-type-llama": (model_type("llama"), True),
    "model-type-olmoe": (model_type("olmoe"), False),
    "config-json-invalid": (invalid_json, False),
    "shape-mismatch": (shape_mismatch, False),
    "missing-shard": (missing_shard, False),
    "missing-tensor": (missing_tensor, False),
    "unexpected-tensor": (unexpected_tensor, False),
    "from-hf-output-not-empty": (output_not_empty("from-hf", "hf"), False),
    "to-hf-output-not-empty": (output_not_empty("to-hf", "ckpt"), True),
    "from-olmo-output-is-a-file": (output_is_a_file, False),
    "to-hf-on-hf-dir": (to_hf_on_hf_dir, True),
    "to-hf-incomplete-checkpoint": (to_hf_incomplete, False),
    "consolidate-missing-source": (missing_source("consolidate"), False),
    "consolidate-truncated-weights": (consolidate_truncated, True),
    "olmo-layer-norm-affine": (olmo_unsupported("layer_norm_with_affine", True), False),
    "olmo-gelu": (olmo_unsupported("activation_type", "gelu"), False),
    "olmo-alibi": (olmo_unsupported("alibi", True), False),
    "olmo-missing-tensor": (olmo_missing_tensor, False),
    "olmo-no-weights": (olmo_no_weights, False),
    # OLMo-2's options mixed with OLMo-1's, either way round.
    "olmo-norm-after-with-layer-norm": (olmo_unsupported("norm_after", True), False),
    "olmo-qk-norm-with-layer-norm": (olmo_unsupported("attention_layer_norm", True), False),
    "olmo2-without-norm-after": (olmo2_options_but("norm_after", False), False),
    "olmo2-rms-norm-without-weights": (olmo2_options_but("layer_norm_with_affine", False), False),
    "olmo2-qk-norm-without-weights": (olmo2_options_but("attention_layer_norm_with_affine", False), False),
    "olmo2-without-qk-norm": (olmo2_options_but("attention_layer_norm", False), False),
    # RoPE that megaolmo does not rotate as transformers does.
    "olmo3-sliding-yarn": (edit_rope("olmo3", {SLIDING: YARN}, ("sliding_attention", "'yarn'", "not plain")), False),
    "olmo3-full-linear": (
        edit_rope("olmo3", {FULL: {"rope_type": "linear", "factor": 2.0}}, ("'linear'", "not supported")),
        False,
    ),
    "olmo2-linear": (edit_rope("olmo2", {"rope_type": "linear", "factor": 2.0}, ("'linear'", "not supported")), False),
    "olmo2-dynamic": (edit_rope("olmo2", {"rope_type": "dynamic", "factor": 2.0}, ("'dynamic'",)), False),
    "olmo2-yarn-untruncated": (edit_rope("olmo2", {**YARN, "truncate": False}, ("truncate=False",)), False),
    "olmo3-yarn-partial-rotary": (
        edit_rope("olmo3", {FULL: {**YARN, "partial_rotary_factor": 0.5}}, ("partial_rotary_factor=0.5",)),
        False,
    ),
    # Models the transformers class would compute differently.
    "to-hf-olmo2-clip-qkv": (to_hf_inexpressible("ckpt_olmo2_clip", ("clip_qkv=0.5", "Olmo2ForCausalLM")), True),
    "to-hf-olmo1-layer-norm-eps": (to_hf_inexpressible("ckpt_olmo1_eps", ("layer_norm_eps=1e-06",)), False),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input(name: str, sources: dict[str, Path], tmp_path: Path, capsys):
    build, in_subprocess = BAD_INPUTS[name]
    bad = build(sources, tmp_path)
    dst = bad.dst or tmp_path / "out"
    before = {p.name: p.read_bytes() for p in dst.iterdir()} if dst.is_dir() else None
    before_file = dst.read_bytes() if dst.is_file() else None

    if in_subprocess:
        result = run_cli(*bad.argv, dst)
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        code, out, err = run_main(capsys, *bad.argv, dst)

    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("error: "), err
    for needle in bad.needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"

    if before is not None:  # an existing output directory is left exactly as it was
        assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    elif before_file is not None:
        assert dst.read_bytes() == before_file
    else:
        assert not dst.exists()
    assert tmp_siblings(dst) == []
