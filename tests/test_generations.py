"""OLMo-2 and OLMo-3 against transformers' Olmo2ForCausalLM and Olmo3ForCausalLM, in fp32 on the CPU.

Each case is a random transformers model at an odd shape (GQA, hidden 96 with 6 heads, vocabulary 301, windows
shorter than the sequence, YaRN past the original context, sequences of one token and of the whole context).
Its tensors become a megaolmo model through `state_from_hf` (the converter's own mapping), and the two must agree
on the logits, the next-token loss and the gradient of every parameter, in eager and in SDPA attention alike.
The models are tiny (2-4 layers), so the whole file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import megaolmo
from megaolmo.config import ModelConfig
from megaolmo.convert import hf as hf_format

REL = 1e-5  # fp32: the two sum in other orders, nothing more
EOS = 7
PAD = 3  # never in the inputs: transformers' embedding has padding_idx, whose row gets no gradient
BATCH = 2

FULL, SLIDING = "full_attention", "sliding_attention"
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}

# arch, layer count, width, heads, kv heads, vocabulary, sequence, context (max_position_embeddings), tied
# embedding, and for OLMo-3 the window and explicit layer_types; yarn is the full-attention layers' RoPE.
CASES = {
    "olmo2-gqa-odd-widths": {"arch": "olmo2", "seq": 17},
    "olmo2-mha-tied": {"arch": "olmo2", "kv_heads": 6, "tie": True, "seq": 13},
    "olmo2-mqa-theta": {"arch": "olmo2", "kv_heads": 1, "theta": 10000.0, "seq": 11},
    "olmo2-yarn": {"arch": "olmo2", "yarn": YARN, "context": 64, "seq": 40},
    "olmo2-yarn-attention-factor": {
        "arch": "olmo2",
        "yarn": {**YARN, "attention_factor": 1.25, "beta_fast": 16.0, "beta_slow": 2.0},
        "context": 64,
        "seq": 64,
    },
    "olmo2-seq-1": {"arch": "olmo2", "seq": 1},
    "olmo2-seq-context": {"arch": "olmo2", "context": 24, "seq": 24},
    "olmo3-window-default-types": {"arch": "olmo3", "layers": 4, "window": 5, "seq": 17},
    "olmo3-window-explicit-types": {
        "arch": "olmo3",
        "layers": 4,
        "window": 5,
        "layer_types": [FULL, SLIDING, FULL, SLIDING],
        "seq": 17,
    },
    "olmo3-window-1-tied": {"arch": "olmo3", "layers": 2, "window": 1, "layer_types": [SLIDING, FULL], "tie": True},
    "olmo3-yarn": {"arch": "olmo3", "layers": 4, "window": 5, "yarn": YARN, "context": 64, "seq": 40},
    "olmo3-yarn-attention-factor-explicit-types": {
        "arch": "olmo3",
        "layers": 3,
        "window": 6,
        "layer_types": [SLIDING, FULL, FULL],
        "yarn": {**YARN, "attention_factor": 0.8},
        "context": 64,
        "seq": 37,
    },
    # DeepSeek's mscale and mscale_all_dim instead of an attention_factor: transformers derives the factor.
    "olmo2-yarn-mscale": {
        "arch": "olmo2",
        "yarn": {**YARN, "mscale": 2.0, "mscale_all_dim": 1.0},
        "context": 64,
        "seq": 40,
    },
    "olmo3-yarn-mscale": {
        "arch": "olmo3",
        "layers": 4,
        "window": 5,
        "yarn": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5},
        "context": 64,
        "seq": 40,
    },
    # transformers' Olmo3 truncates YaRN's ramp whatever `truncate` says (it looks for the key at the top of
    # the per-layer-type rope_parameters), and so does megaolmo. At theta 100 the ramp's ends are fractional:
    # an Olmo2 here, which does honor truncate=False, moves its logits by O(1) (from-hf refuses that one).
    "olmo3-yarn-untruncated-theta-100": {
        "arch": "olmo3",
        "layers": 4,
        "window": 5,
        "theta": 100.0,
        "yarn": {**YARN, "truncate": False},
        "context": 64,
        "seq": 40,
    },
    "olmo3-seq-1": {"arch": "olmo3", "layers": 4, "window": 5, "yarn": YARN, "context": 64, "seq": 1},
    "olmo3-seq-context": {"arch": "olmo3", "layers": 4, "window": 5, "yarn": YARN, "context": 48, "seq": 48},
}
DEFAULTS = {
    "layers": 3,
    "d_model": 96,
    "heads": 6,
    "kv_heads": 2,
    "vocab": 301,
    "context": 32,
    "seq": 17,
    "tie": False,
    "theta": 500000.0,
    "yarn": None,
    "window": None,
    "layer_types": None,
}
HF_CLASSES = {"olmo2": transformers.Olmo2ForCausalLM, "olmo3": transformers.Olmo3ForCausalLM}


def hf_config(spec: dict, attention: str) -> transformers.PretrainedConfig:
    rope = {"rope_type": "default", "rope_theta": spec["theta"]}
    full = rope if spec["yarn"] is None else {**spec["yarn"], "rope_theta": spec["theta"]}
    values = {
        "vocab_size": spec["vocab"],
        "hidden_size": spec["d_model"],
        "intermediate_size": 80,
        "num_hidden_layers": spec["layers"],
        "num_attention_heads": spec["heads"],
        "num_key_value_heads": spec["kv_heads"],
        "max_position_embeddings": spec["context"],
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": spec["tie"],
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "bos_token_id": None,
        "attn_implementation": attention,
    }
    if spec["arch"] == "olmo2":
        return transformers.Olmo2Config(**values, rope_parameters=full)
    return transformers.Olmo3Config(
        **values,
        sliding_window=spec["window"],
        layer_types=spec["layer_types"],
        rope_parameters={FULL: full, SLIDING: rope},
    )


def random_hf_model(spec: dict, attention: str, seed: int) -> transformers.PreTrainedModel:
    """Weights large enough to matter: matrices N(0, 0.15), every norm weight in [0.5, 1.5]."""
    model = HF_CLASSES[spec["arch"]](hf_config(spec, attention)).eval()
    assert model.config._attn_implementation == attention
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                assert name.endswith("norm.weight"), name
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == spec["tie"]
    return model


def megaolmo_twin(hf: transformers.PreTrainedModel) -> megaolmo.OLMo:
    """The megaolmo model of `hf`'s config and tensors, as from-hf makes it (torch kernels, fp32, CPU)."""
    config = dataclasses.replace(hf_format.config_from_hf(hf.config.to_dict(), "hf"), kernels="torch")
    model = megaolmo.build_model(config, init=False)
    model.load_state_dict(hf_format.state_from_hf(config, hf.state_dict(), "hf"))
    return model.eval()


def inputs(vocab: int, seq: int, seed: int) -> torch.Tensor:
    """Token ids over the whole vocabulary but the pad token (its embedding row is frozen in transformers)."""
    ids = torch.randint(0, vocab - 1, (BATCH, seq), generator=torch.Generator().manual_seed(seed))
    return ids + (ids >= PAD).long()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = REL) -> None:
    assert actual.shape == expected.shape, what
    assert actual.dtype == expected.dtype == torch.float32, what
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert scale > 0, f"{what} is all zero"
    assert err <= rel * scale, f"{what}: max |difference| {err:.3g} > {rel} * max |value| {scale:.3g}"


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Mean cross entropy of each next token over the true vocabulary (transformers' `labels=ids` loss)."""
    return F.cross_entropy(logits[:, :-1, :vocab].flatten(0, 1), ids[:, 1:].flatten())


def check_config(config: ModelConfig, spec: dict) -> None:
    """from-hf read what the case sets: the comparison then tests the feature, not a default."""
    read = {
        "arch": config.arch,
        "d_model": config.d_model,
        "layers": config.n_layers,
        "heads": config.n_heads,
        "kv_heads": config.kv_heads,
        "vocab": config.padded_vocab_size,
        "tie": config.weight_tying,
        "context": config.max_sequence_length,
        "theta": config.rope_theta,
    }
    assert read == {key: spec[key] for key in read}
    assert config.layer_norm_eps == 1e-6
    assert config.qk_norm and config.norm_after and config.clip_qkv is None
    if spec["arch"] == "olmo3":
        default = [FULL if (i + 1) % 4 == 0 else SLIDING for i in range(spec["layers"])]
        assert config.block_layer_types == (spec["layer_types"] or default)
        assert config.sliding_window == spec["window"]
    else:
        assert config.block_layer_types == [FULL] * spec["layers"]
    yarn = spec["yarn"]
    if yarn is None:
        assert config.rope_scaling is None
        return
    assert config.rope_scaling == "yarn"
    assert (config.rope_scaling_factor, config.rope_original_max_position) == (4.0, 16)
    assert spec["seq"] == 1 or spec["seq"] > 16  # past the original context
    factor = yarn_attention_factor(yarn)
    assert config.yarn_attention_factor == (None if factor is None else pytest.approx(factor, rel=1e-12))
    assert (config.yarn_beta_fast, config.yarn_beta_slow) == (yarn.get("beta_fast", 32.0), yarn.get("beta_slow", 1.0))
    assert [config.rope_scaled(i) for i in range(config.n_layers)] == [
        t == FULL for t in config.block_layer_types
    ]  # YaRN on the full-attention layers only


def yarn_attention_factor(yarn: dict) -> float | None:
    """The attention factor a case's YaRN states: given, or mscale's ratio (None: megaolmo's default)."""
    if "mscale" in yarn:
        log = math.log(yarn["factor"])
        return (0.1 * yarn["mscale"] * log + 1) / (0.1 * yarn["mscale_all_dim"] * log + 1)
    return yarn.get("attention_factor")


def spec_of(case: str) -> dict:
    return {**DEFAULTS, **CASES[case]}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_loss_and_gradients_match_transformers(case: str, attention: str):
    spec = spec_of(case)
    seed = list(CASES).index(case)
    hf = random_hf_model(spec, attention, seed)
    ours = megaolmo_twin(hf)
    check_config(ours.config, spec)
    ids = inputs(spec["vocab"], spec["seq"], seed)

    hf_out = hf(ids, labels=ids if spec["seq"] > 1 else None)
    logits = ours(ids)
    assert logits.shape == hf_out.logits.shape == (BATCH, spec["seq"], spec["vocab"])
    assert logits.abs().max() > 1.0  # the weights matter
    assert_close(logits, hf_out.logits, "logits")

    if spec["seq"] > 1:
        loss = next_token_loss(logits, ids, spec["vocab"])
        assert hf_out.loss.dtype == torch.float32
        assert abs(loss.item() - hf_out.loss.item()) <= REL * hf_out.loss.item(), (loss.item(), hf_out.loss.item())
        hf_objective, objective = hf_out.loss, loss
    else:  # one token has no next one: differentiate a fixed random projection of the logits instead
        probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
        hf_objective, objective = (hf_out.logits * probe).sum(), (logits * probe).sum()
    hf_objective.backward()
    objective.backward()

    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    assert all(grad is not None for grad in hf_grads.values())
    expected = hf_format.state_from_hf(ours.config, hf_grads, "transformers' gradients")
    grads = {name: p.grad for name, p in ours.named_parameters()}
    assert sorted(grads) == sorted(expected) == sorted(ours.state_dict())
    # Where a query sees one key (the only token, or a window of 1), q and k have exactly no effect: that
    # softmax is 1 whatever the score. Both gradients are zero up to rounding there, and then compared to the
    # largest gradient of all.
    overall = max(grad.abs().max().item() for grad in expected.values())
    one_key = {i for i in range(spec["layers"]) if spec["seq"] == 1 or ours.config.attention_window(i) == 1}
    for name, grad in grads.items():
        assert grad is not None, name
        if name.endswith(("q_norm.weight", "k_norm.weight")) and int(name.split(".")[1]) in one_key:
            assert max(grad.abs().max().item(), expected[name].abs().max().item()) <= REL * overall, name
            continue
        assert_close(grad, expected[name], f"gradient of {name}")


def perturbed(config: ModelConfig, spec: dict) -> list[ModelConfig]:
    """The case's config with each feature it tests turned off: the window, YaRN."""
    variants = []
    if spec["window"] is not None:
        variants.append(dataclasses.replace(config, sliding_window=10**6))
    if spec["yarn"] is not None:
        variants.append(dataclasses.replace(config, rope_scaling=None))
        if yarn_attention_factor(spec["yarn"]) is not None:
            variants.append(dataclasses.replace(config, yarn_attention_factor=None))
    return variants


@pytest.mark.parametrize(
    "case", [c for c in CASES if spec_of(c)["seq"] > 1 and (CASES[c].get("window") or CASES[c].get("yarn"))]
)
def test_windows_and_yarn_change_the_logits(case: str):
    """The cases above would pass with a feature ignored only if it changed nothing: show that each one bites."""
    spec = spec_of(case)
    hf = random_hf_model(spec, "eager", 0)
    ours = megaolmo_twin(hf)
    ids = inputs(spec["vocab"], spec["seq"], 0)
    with torch.no_grad():
        reference = ours(ids)
        for config in perturbed(ours.config, spec):
            other = megaolmo.build_model(config, init=False)
            other.load_state_dict(ours.state_dict())
            difference = (other.eval()(ids) - reference).abs().max().item()
            assert difference > 1e-2 * reference.abs().max().item(), config


def test_to_hf_refuses_a_yarn_factor_transformers_4_would_read_otherwise() -> None:
    """transformers 4.x takes YaRN's factor from max_position_embeddings / original: they must agree."""
    from megaolmo.convert.hf import check_hf_expressible
    from megaolmo.errors import ConversionError

    yarn = {"rope_scaling": "yarn", "rope_scaling_factor": 8.0, "rope_original_max_position": 8192}
    check_hf_expressible(ModelConfig(arch="olmo2", max_sequence_length=65536, **yarn), "src")
    with pytest.raises(ConversionError, match="max_sequence_length=32768 is not rope_scaling_factor x"):
        check_hf_expressible(ModelConfig(arch="olmo2", max_sequence_length=32768, **yarn), "src")
