"""Model presets, config validation and the installed package layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import small_model

from megaolmo import ConfigError, ModelConfig, build_model
from megaolmo.config import model_presets

# Parameter counts published for OLMo (OLMO_REFERENCE.md).
PUBLISHED_PARAMS = {"olmo_1b": 1.18e9, "olmo_7b": 6.89e9, "olmo_65b": 65.6e9, "olmo_70b": 69.3e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_big_presets_build_on_meta_with_published_parameter_counts(name: str) -> None:
    config = ModelConfig.preset(name)
    model = build_model(config, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    assert count == config.num_params()
    assert abs(count - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.005
    assert config.head_dim == 128 and config.padded_vocab_size == 50304


def test_meta_model_forward_gives_logit_shapes_without_memory() -> None:
    model = build_model(ModelConfig.preset("olmo_70b"), device="meta")
    logits = model(torch.zeros(1, 16, dtype=torch.long, device="meta"))
    assert logits.shape == (1, 16, 50304)


def test_presets_match_the_reference_architecture() -> None:
    assert ModelConfig.preset("olmo_1b").weight_tying
    assert not ModelConfig.preset("olmo_7b").weight_tying
    seventy = ModelConfig.preset("olmo_70b")
    assert (seventy.kv_heads, seventy.clip_qkv, seventy.max_sequence_length) == (8, 8.0, 4096)
    assert model_presets() == ["olmo_1b", "olmo_65b", "olmo_70b", "olmo_7b", "olmo_tiny"]
    for name in PUBLISHED_PARAMS:
        config = ModelConfig.preset(name)
        assert (config.eos_token_id, config.pad_token_id, config.rope_theta) == (50279, 1, 10000.0)


def test_preset_overrides_and_unknown_preset() -> None:
    assert ModelConfig.preset("olmo_tiny", n_layers=2).n_layers == 2
    with pytest.raises(ConfigError, match="unknown model preset 'olmo_3b'"):
        ModelConfig.preset("olmo_3b")


def test_vocab_padding() -> None:
    assert ModelConfig(vocab_size=1000).padded_vocab_size == 1024
    assert ModelConfig(vocab_size=1024).padded_vocab_size == 1024
    assert ModelConfig(vocab_size=1000, embedding_size=1000).padded_vocab_size == 1000


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 100, "n_heads": 3}, "model.d_model=100 is not divisible by model.n_heads=3"),
        ({"n_kv_heads": 3}, "model.n_kv_heads=3 must be a positive divisor of model.n_heads=4"),
        ({"d_model": 12, "n_heads": 4}, "head_dim=3"),
        ({"embedding_size": 10}, "model.embedding_size=10 is smaller than model.vocab_size=4096"),
        ({"attention": "eager"}, "model.attention='eager' is not one of sdpa, flash"),
        ({"kernels": "cuda"}, "model.kernels='cuda'"),
        ({"n_layers": 0}, "model.n_layers=0 must be a positive integer"),
        ({"clip_qkv": -1.0}, "model.clip_qkv=-1.0 must be positive"),
    ],
)
def test_invalid_configs_fail_with_one_clear_line(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        ModelConfig(**overrides)
    assert "\n" not in str(info.value)


def test_unknown_keys_from_a_checkpoint_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown model config keys \\['d_modle'\\]"):
        ModelConfig.from_dict({"d_modle": 64})


def test_flash_attention_without_flash_attn_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # as on a machine without flash-attn
    model = build_model(small_model(n_layers=1, ffn_hidden_size=64, vocab_size=4096, attention="flash"))
    with pytest.raises(ConfigError, match="model.attention=flash needs flash-attn"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_kernels_is_installed_inside_megaolmo_never_top_level(tmp_path: Path) -> None:
    """PyPI has a `kernels` package that transformers probes for; ours must only be megaolmo.kernels."""
    code = (
        "import importlib.util, megaolmo.kernels, pathlib;"
        "print(importlib.util.find_spec('kernels') is None or"
        " pathlib.Path(importlib.util.find_spec('kernels').origin).parent != pathlib.Path(megaolmo.kernels.__file__).parent);"
        "print(pathlib.Path(megaolmo.kernels.__file__).parent.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "kernels"]
