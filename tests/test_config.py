"""Model presets, config validation and the installed package layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import small_model

from megaolmo import ConfigError, ModelConfig, build_model
from megaolmo.config import Config, OptimConfig, ParallelConfig, TrainerConfig, model_presets, resolve
from megaolmo.config.resolve import resolve_warmup_steps
from megaolmo.plan.__main__ import compose_config
from megaolmo.train.optim import build_optimizer, learning_rate

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
    sizes = {"olmo_1b", "olmo_7b", "olmo_65b", "olmo_70b", "olmo_tiny", *PUBLISHED_OLMO2_PARAMS}
    assert sizes <= set(model_presets())  # other presets (small OLMo-2/3 ones for tests) may sit beside them
    for name in PUBLISHED_PARAMS:
        config = ModelConfig.preset(name)
        assert (config.eos_token_id, config.pad_token_id, config.rope_theta) == (50279, 1, 10000.0)


# Parameter counts published for OLMo-2 and OLMo-3, and where (the shapes are in /work/notes/olmo2_facts.md).
PUBLISHED_OLMO2_PARAMS = {
    # allenai/OLMo-2-0425-1B/tree/main: fp32 safetensors of 4.98 GB + 956 MB = 5.936e9 bytes / 4 bytes
    "olmo2_1b": 1.484e9,
    "olmo2_7b": 7.3e9,  # "Model size 7.3B params": huggingface.co/allenai/OLMo-2-1124-7B-GGUF
    "olmo2_13b": 13.7e9,  # "Model size 13.7B params": huggingface.co/allenai/OLMo-2-1124-13B-Instruct-GGUF
    "olmo2_32b": 32.2e9,  # "Model size 32.2B params": huggingface.co/allenai/OLMo-2-0325-32B-Instruct-GGUF
    # 7,298,011,136: HF metadata of a fine-tune of allenai/Olmo-3-1025-7B (its vocabulary cut to 100278 rows;
    # megaolmo keeps OLMo-core's 100352, +606,208)
    "olmo3_7b": 7_298_011_136,
    # no count found for allenai/Olmo-3-1125-32B; its model card gives OLMo-2 32B's shapes, so OLMo-2 32B's 32.2B
    "olmo3_32b": 32.2e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_OLMO2_PARAMS))
def test_olmo2_and_olmo3_presets_build_on_meta_with_published_parameter_counts(name: str) -> None:
    config = ModelConfig.preset(name)
    model = build_model(config, device="meta")
    count = sum(p.numel() for p in model.parameters())
    assert count == config.num_params()
    assert abs(count - PUBLISHED_OLMO2_PARAMS[name]) / PUBLISHED_OLMO2_PARAMS[name] < 0.005
    assert (config.head_dim, config.vocab_size, config.padded_vocab_size) == (128, 100278, 100352)


def test_olmo2_and_olmo3_presets_match_the_reference_architecture() -> None:
    """The dolma2 tokenizer's ids, RoPE and norm constants, init, no clip_qkv; OLMo-3's windows on three of
    every four blocks (full at 3, 7, ...: OLMo-core's pattern [4096, 4096, 4096, -1])."""
    for name in ("olmo2_1b", "olmo2_7b", "olmo2_13b", "olmo2_32b", "olmo3_7b", "olmo3_32b"):
        config = ModelConfig.preset(name)
        assert (config.eos_token_id, config.pad_token_id, config.rope_theta) == (100257, 100277, 500000.0), name
        assert (config.layer_norm_eps, config.init_method, config.init_std) == (1e-6, "normal", 0.02), name
        assert not config.weight_tying and config.clip_qkv is None and config.norm_after and config.qk_norm, name
    assert ModelConfig.preset("olmo2_7b").max_sequence_length == 4096
    assert ModelConfig.preset("olmo2_32b").kv_heads == 8
    for name in ("olmo3_7b", "olmo3_32b"):
        config = ModelConfig.preset(name)
        assert (config.arch, config.sliding_window, config.max_sequence_length) == ("olmo3", 4096, 8192)
        full = [i for i in range(config.n_layers) if config.attention_window(i) is None]
        assert full == list(range(3, config.n_layers, 4)), name
    # The long-context variant the presets' comment gives: YaRN x8 from 8192 on the full-attention layers.
    long = ModelConfig.preset(
        "olmo3_7b", max_sequence_length=65536, rope_scaling="yarn", rope_scaling_factor=8.0,
        rope_original_max_position=8192,
    )  # fmt: skip
    assert [long.rope_scaled(i) for i in range(4)] == [False, False, False, True]


def warmup_config(**optim: object) -> Config:
    """OLMo-2 7B's batch (1024 x 4096 tokens) with these optim fields."""
    return Config(
        model=ModelConfig(max_sequence_length=4096),
        optim=OptimConfig(**optim),
        trainer=TrainerConfig(global_batch_size=1024, micro_batch_size=2, max_steps=10_000),
    )


def test_warmup_tokens_become_steps_at_resolve() -> None:
    """OLMo-2's 8388608000 warmup tokens are 2000 steps of 1024 x 4096; a partial step rounds up."""
    config = warmup_config(warmup_steps=None, warmup_tokens=8_388_608_000)
    resolve(config, world_size=1)
    assert config.optim.warmup_steps == 2000
    resolve(config, world_size=1)  # the steps it wrote agree with the tokens: resolving again changes nothing
    assert config.optim.warmup_steps == 2000
    assert resolve_warmup_steps(warmup_config(warmup_steps=None, warmup_tokens=4_194_305), 4096) == 2
    assert resolve_warmup_steps(warmup_config(warmup_steps=None, warmup_tokens=0), 4096) == 0
    assert resolve_warmup_steps(warmup_config(warmup_steps=300), 4096) == 300  # no tokens: the steps
    optim = OptimConfig(lr=1.0, warmup_steps=None, warmup_tokens=8_388_608_000, warmup_start=0.0)
    with pytest.raises(ConfigError, match="not resolved into optim.warmup_steps yet"):
        learning_rate(optim, 0, 10_000)
    optim.warmup_steps = 2000
    assert learning_rate(optim, 999, 10_000) == pytest.approx(0.5)  # OLMo-2 warms up from 0; its step 1000
    assert learning_rate(optim, 0, 10_000) == pytest.approx(1 / 2000)  # the first step takes one increment
    assert learning_rate(optim, 1999, 10_000) == pytest.approx(1.0)  # warm at OLMo's step 2000


@pytest.mark.parametrize(
    ("optim", "message"),
    [
        ({"warmup_steps": 2000, "warmup_tokens": 4_194_304_000},
         "optim.warmup_tokens=4194304000 (1000 steps of 4194304 tokens) and optim.warmup_steps=2000 both set"),
        ({"warmup_steps": None}, "optim.warmup_steps=null needs optim.warmup_tokens"),
        ({"warmup_steps": None, "warmup_tokens": -1}, "optim.warmup_tokens=-1 must be a token count >= 0 or null"),
        ({"warmup_steps": -5}, "optim.warmup_steps=-5 must be >= 0"),
    ],
)  # fmt: skip
def test_a_warmup_in_steps_and_in_tokens_is_one_clear_line(optim: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        resolve(warmup_config(**optim), world_size=1)
    assert "\n" not in str(info.value)


def test_olmo2_optimizer_recipe() -> None:
    """conf/optim/olmo2.yaml as the 7B recipe composes it: eps 1e-8, a warmup from 0 over 2000 steps of 4M tokens,
    and weight decay on every norm weight (decay_norm_and_bias) but not on the embedding."""
    config = compose_config(["experiment=olmo2_7b"])
    assert (config.optim.eps, config.optim.warmup_tokens, config.optim.warmup_start) == (1e-8, 8_388_608_000, 0.0)
    assert (config.trainer.z_loss, config.trainer.precision) == (1e-5, "bf16")
    resolve(config, world_size=64)
    assert config.optim.warmup_steps == 2000
    small = {
        "n_layers": 1,
        "d_model": 128,
        "n_heads": 2,
        "ffn_hidden_size": 64,
        "vocab_size": 512,
        "embedding_size": None,
    }
    model = build_model(ModelConfig.preset("olmo2_1b", **small), device="meta")
    optimizer = build_optimizer(list(model.named_parameters()), config.optim, torch.device("cpu"))
    decayed, exempt = (group["params"] for group in optimizer.param_groups)
    names = {id(param): name for name, param in model.named_parameters()}
    assert [names[id(p)] for p in exempt] == ["wte.weight"]
    assert {"blocks.0.attn_norm.weight", "blocks.0.q_norm.weight", "ln_f.weight"} <= {names[id(p)] for p in decayed}
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]


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


@pytest.mark.parametrize(
    ("model", "parallel", "seq_len", "world_size", "message"),
    [
        ({}, {"cp": 2}, 62, 2, "sequence length 62 is not divisible by 2 x parallel.cp=2"),
        ({}, {"cp": 2, "tp": 4, "sequence_parallel": True}, 36, 8, "a CP rank's 18 tokens .* by parallel.tp=4"),
        ({"attention": "flash"}, {"cp": 2}, 64, 2, "parallel.cp=2 computes attention as a ring of torch SDPA"),
        ({"compile": True}, {"cp": 2}, 64, 2, "parallel.cp=2 with model.compile=true"),
        ({}, {"cp": 2, "tp": 2}, 64, 6, "world size 6 is not parallel.tp=2 x parallel.cp=2 x parallel.pp=1"),
    ],
)
def test_context_parallel_layouts_are_checked_in_one_line(
    model: dict, parallel: dict, seq_len: int, world_size: int, message: str
) -> None:
    config = Config(
        model=ModelConfig(n_layers=2, d_model=64, n_heads=4, max_sequence_length=64, **model),
        parallel=ParallelConfig(**parallel),
        trainer=TrainerConfig(seq_len=seq_len, global_batch_size=4, micro_batch_size=1),
    )
    with pytest.raises(ConfigError, match=message) as info:
        resolve(config, world_size)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="parallel.cp=0 must be a positive integer"):
        ParallelConfig(cp=0)


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
