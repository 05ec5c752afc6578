"""The OLMo model against transformers' OlmoForCausalLM on the same weights (CPU, fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import small_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from megaolmo import ModelConfig, build_model
from megaolmo.convert.hf import config_to_hf, state_to_hf

CONFIGS = {
    "tied": small_model(ffn_hidden_size=128, weight_tying=True),
    "untied": small_model(ffn_hidden_size=128, weight_tying=False),
    "gqa": small_model(n_heads=8, n_kv_heads=2),
    # A clamp at 0.05 cuts most of the q/k/v entries of this init (std ~0.6): the clip really bites.
    "clip_qkv": small_model(ffn_hidden_size=128, clip_qkv=0.05),
    # hidden 96 (3 heads of 32), SwiGLU width 200, vocab 1000 padded to 1024.
    "odd_sizes": small_model(
        d_model=96, n_layers=3, n_heads=3, ffn_hidden_size=200, vocab_size=1000, weight_tying=False
    ),
}
MAX_SEQ = 24


def hf_twin(model) -> transformers.OlmoForCausalLM:
    """A transformers OLMo holding exactly the weights of a megaolmo model."""
    config = model.config
    hf_config = config_to_hf(config, torch.float32)
    hf_config.pop("torch_dtype")
    hf = transformers.OlmoForCausalLM(transformers.OlmoConfig(**hf_config, attn_implementation="eager"))
    missing, unexpected = hf.load_state_dict(state_to_hf(config, model.state_dict()), strict=False)
    assert not unexpected and all("rotary" in name for name in missing)
    return hf.eval()


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[name]
    config = dataclasses.replace(config, max_sequence_length=MAX_SEQ)
    return build_model(config)


def max_rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seq_len", [1, 7, MAX_SEQ])
def test_logits_match_transformers(name: str, seq_len: int) -> None:
    model = build(name).eval()
    hf = hf_twin(model)
    input_ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(input_ids)
        theirs = hf(input_ids).logits
    assert ours.shape == (2, seq_len, model.config.padded_vocab_size)
    assert max_rel_diff(ours, theirs) < 1e-5


def test_clip_qkv_changes_the_output() -> None:
    """Guards the clip_qkv case above against a clamp too loose to matter."""
    model = build("clip_qkv").eval()
    unclipped = build_model(dataclasses.replace(model.config, clip_qkv=None))
    unclipped.load_state_dict(model.state_dict())
    input_ids = torch.randint(0, 256, (1, MAX_SEQ))
    with torch.no_grad():
        assert max_rel_diff(model(input_ids), unclipped(input_ids)) > 1e-2


@pytest.mark.parametrize("name", ["untied", "gqa", "odd_sizes"])
def test_loss_and_gradients_match_transformers(name: str) -> None:
    model = build(name)
    hf = hf_twin(model).train()
    vocab = model.config.padded_vocab_size
    input_ids = torch.randint(0, model.config.vocab_size, (2, MAX_SEQ))
    # transformers gives the embedding padding_idx=pad_token_id (OLMo does not), freezing that row's gradient;
    # padding never occurs in OLMo's data, so leave it out here.
    input_ids[input_ids == model.config.pad_token_id] = model.config.pad_token_id + 1
    labels = torch.roll(input_ids, -1, dims=1)
    loss = F.cross_entropy(model(input_ids).reshape(-1, vocab), labels.reshape(-1))
    hf_loss = F.cross_entropy(hf(input_ids).logits.reshape(-1, vocab), labels.reshape(-1))
    assert abs(loss.item() - hf_loss.item()) < 1e-5 * hf_loss.item()
    loss.backward()
    hf_loss.backward()
    ours = state_to_hf(model.config, {n: p.grad for n, p in model.named_parameters()})
    for hf_name, grad in ours.items():
        assert max_rel_diff(grad, hf.get_parameter(hf_name).grad) < 1e-5, hf_name


def test_padding_rows_of_the_vocab_are_trained_through_the_softmax() -> None:
    """Padding rows of the embedding exist (vocab 1000 -> 1024) and are trained only through the softmax."""
    model = build("odd_sizes")
    assert model.wte.weight.shape[0] == 1024
    input_ids = torch.randint(0, 1000, (1, 8))
    model(input_ids).logsumexp(-1).sum().backward()
    assert model.head.weight.grad[1000:].abs().sum() > 0


def test_activations_are_sequence_first_inside_the_stack() -> None:
    model = build("gqa")
    shapes = []
    model.blocks["0"].register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    model(torch.zeros(3, 5, dtype=torch.long))
    assert shapes == [(5, 3, 64)]


def test_mitchell_init_scales_output_projections_by_depth() -> None:
    torch.manual_seed(0)
    config = ModelConfig(d_model=256, n_layers=4, n_heads=4, ffn_hidden_size=512, weight_tying=False)
    model = build_model(config)
    assert abs(model.wte.weight.std().item() - 256**-0.5) < 0.05 * 256**-0.5
    for i, block in enumerate(model.blocks.values()):
        for weight, std in (
            (block.att_proj.weight, 256**-0.5),
            (block.attn_out.weight, (2 * 256 * (i + 1)) ** -0.5),
            (block.ff_out.weight, (2 * 512 * (i + 1)) ** -0.5),
        ):
            # A normal truncated at 3 std has std 0.9866 * std and no value past 3 std.
            assert abs(weight.std().item() - 0.9866 * std) < 0.05 * std
            assert weight.abs().max().item() <= 3 * std + 1e-7


def test_sequence_longer_than_the_context_is_refused() -> None:
    model = build("tied")
    with pytest.raises(ValueError, match="max_sequence_length=24"):
        model(torch.zeros(1, MAX_SEQ + 1, dtype=torch.long))


# OLMo-2 and OLMo-3: the pieces beside the block (the block itself is checked against transformers in
# test_generations.py and on every layout in test_parallel.py)

OLMO3 = small_model(arch="olmo3", sliding_window=4, n_layers=4, n_kv_heads=2, layer_norm_eps=1e-6, kernels="torch")


def test_sliding_window_attention_sees_the_window_and_itself() -> None:
    from megaolmo.model.olmo import causal_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(9, 2, 4, 8) for _ in range(3))  # [s, b, heads, hd]
    out = causal_attention(q, k, v, "sdpa", window=3)
    for i in range(9):
        keys = slice(max(0, i - 2), i + 1)  # three keys: i-2, i-1, i
        scores = torch.einsum("bhd,jbhd->bhj", q[i], k[keys]) / 8**0.5
        expected = torch.einsum("bhj,jbhd->bhd", scores.softmax(-1), v[keys])
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(causal_attention(q, k, v, "sdpa", window=9), causal_attention(q, k, v, "sdpa"))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (windowed) attention in float64 from its definition, k/v heads repeated for GQA: [s, b, h, hd]."""
    s, groups = q.shape[0], q.shape[2] // k.shape[2]
    k, v = (t.double().repeat_interleave(groups, dim=2) for t in (k, v))
    scores = torch.einsum("ibhd,jbhd->bhij", q.double(), k) / q.shape[-1] ** 0.5
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    return torch.einsum("bhij,jbhd->ibhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


class AtenOps(TorchDispatchMode):
    """The aten ops run under it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("window", [None, 3], ids=["causal", "window3"])
def test_sdpa_attention_reads_strided_heads_and_copies_nothing_on_cpu(window: int | None) -> None:
    """fp32 GQA on the fused kernel (flash only allowed: no math fallback), q/k/v the views the block makes,
    and the output already in [s, b, heads, hd] order: no copy in, none out, k/v never expanded."""
    from megaolmo.model.olmo import causal_attention

    torch.manual_seed(0)
    qkv = torch.randn(10, 2, (4 + 2 + 2) * 8)  # [s, b, q + k + v] as att_proj writes it; 4 query heads, 2 k/v
    q, k, v = (t.view(10, 2, -1, 8) for t in qkv.split([32, 16, 16], dim=-1))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), AtenOps() as ops:
        out = causal_attention(q, k, v, "sdpa", window=window)
    copies = {"clone", "contiguous", "copy_", "_to_copy", "repeat_interleave", "index_select", "expand"}
    assert not copies & {name.split(".")[0] for name in ops.names}, ops.names
    assert out.is_contiguous()  # the reshape feeding attn_out is a view
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, window), rtol=1e-5, atol=1e-6)


def test_gqa_expands_k_and_v_only_where_sdpa_would_fall_back_to_the_math_kernel() -> None:
    from megaolmo.model.olmo import sdpa_takes_gqa

    for dtype in (torch.float32, torch.bfloat16):
        assert sdpa_takes_gqa("cpu", dtype, masked=True) and sdpa_takes_gqa("cpu", dtype, masked=False)
    assert sdpa_takes_gqa("cuda", torch.bfloat16, masked=False) and sdpa_takes_gqa("cuda", torch.float16, masked=False)
    assert not sdpa_takes_gqa("cuda", torch.float32, masked=False)  # flash has no fp32: memory-efficient, expanded
    assert not sdpa_takes_gqa("cuda", torch.bfloat16, masked=True)  # flash takes no mask


def test_olmo3_layer_types_and_yarn_placement() -> None:
    from megaolmo.model.olmo import OLMo

    assert OLMO3.block_layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    yarn = dataclasses.replace(OLMO3, rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_position=8)
    with torch.device("meta"):
        blocks = list(OLMo(yarn).blocks.values())
    assert [block.window for block in blocks] == [4, 4, 4, None]
    assert [block.yarn is not None for block in blocks] == [False, False, False, True]


def test_yarn_tables_equal_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megaolmo.model.rope import Yarn, rope_tables

    for attention_factor in (None, 1.3):
        hf_config = transformers.Olmo2Config(
            hidden_size=96, num_attention_heads=6, max_position_embeddings=64, rope_theta=500000.0,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                          "attention_factor": attention_factor},
        )  # fmt: skip
        inverse, scale = ROPE_INIT_FUNCTIONS["yarn"](hf_config, torch.device("cpu"))
        angles = torch.outer(torch.arange(40, dtype=torch.float32), inverse)
        yarn = Yarn(factor=4.0, original_max_position=16, attention_factor=attention_factor)
        cos, sin = rope_tables(40, 16, 500000.0, torch.device("cpu"), yarn)
        assert torch.equal(cos, angles.cos() * scale) and torch.equal(sin, angles.sin() * scale)


def test_olmo2_init_is_normal_with_norms_at_one() -> None:
    config = small_model(arch="olmo2", d_model=128, n_heads=4, vocab_size=4096, weight_tying=False, kernels="torch")
    model = build_model(config, seed=3)
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or name == "ln_f.weight":
            assert torch.equal(param, torch.ones_like(param)), name
        else:  # every weight, the embedding too: N(0, 0.02) cut at 3 std
            assert abs(param.std().item() - 0.02) < 0.002 and param.abs().max().item() <= 0.06, name


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"arch": "olmo4"}, "model.arch='olmo4' is not one of olmo1, olmo2, olmo3"),
        ({"arch": "olmo2", "sliding_window": 8}, "set model.arch=olmo3"),
        ({"arch": "olmo3"}, "model.sliding_window=None must be a positive integer"),
        ({"arch": "olmo3", "sliding_window": 8, "layer_types": ["full_attention"]}, "for each of the model.n_layers"),
        ({"rope_scaling": "linear"}, "model.rope_scaling='linear' is not one of yarn"),
        ({"rope_scaling": "yarn"}, "model.rope_original_max_position=None must be the positive"),
        ({"init_fn": "xavier"}, "model.init_fn='xavier' is not one of auto, mitchell, normal"),
    ],
)
def test_generation_fields_are_checked_in_one_line(overrides: dict, needle: str) -> None:
    from megaolmo.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        small_model(**overrides)
    assert needle in str(error.value) and "\n" not in str(error.value)
