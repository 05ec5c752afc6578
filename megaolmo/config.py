"""Typed configuration of megaolmo.

Every key lives in a dataclass with a type, a default and a one-line comment;
presets are plain instances. Validation happens here, before any tensor or
process group exists, and fails with one line that names the bad value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration value that megaolmo cannot run with; the message says which and how to fix it."""


ATTENTION_BACKENDS = ("sdpa", "flash")
KERNEL_BACKENDS = ("auto", "torch", "triton")


@dataclass
class ModelConfig:
    """The OLMo-1 architecture: decoder-only, pre-norm, parameter-free LayerNorm, SwiGLU, RoPE, no biases."""

    d_model: int = 256  # hidden size
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads; head_dim = d_model // n_heads
    n_kv_heads: int | None = None  # key/value heads (GQA); None means n_heads
    ffn_hidden_size: int = 704  # SwiGLU hidden width F (ff_proj emits 2F: [up | gate]); HF intermediate_size
    vocab_size: int = 4096  # tokenizer vocabulary (ids the data can contain)
    embedding_size: int | None = None  # embedding rows; None pads vocab_size up to a multiple of 128
    max_sequence_length: int = 256  # longest sequence the model is trained or evaluated on
    rope_theta: float = 10000.0  # RoPE base
    clip_qkv: float | None = None  # clamp the fused qkv projection to [-clip_qkv, clip_qkv]; None disables
    weight_tying: bool = True  # logits use wte.T instead of a separate head
    layer_norm_eps: float = 1e-5  # epsilon of the parameter-free LayerNorm
    eos_token_id: int = 0  # end-of-document token appended after every document (OLMo's tokenizer: 50279)
    pad_token_id: int = 1  # padding token (never trained on)
    attention: str = "sdpa"  # sdpa (torch scaled_dot_product_attention) | flash (flash-attn)
    kernels: str = "auto"  # RoPE/SwiGLU/LayerNorm: triton (fused kernels) | torch (references) | auto (triton on CUDA)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kv_heads(self) -> int:
        """Effective number of key/value heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding (and columns of the logits)."""
        if self.embedding_size is not None:
            return self.embedding_size
        return -(-self.vocab_size // 128) * 128

    def validate(self) -> None:
        """Reject inconsistent shapes with one line naming the value and the fix."""
        for name in ("d_model", "n_layers", "n_heads", "ffn_hidden_size", "vocab_size", "max_sequence_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name}={value!r} must be a positive integer")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "choose n_heads that divides d_model"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} (d_model/n_heads) must be even for RoPE")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} must be a positive divisor of model.n_heads={self.n_heads}"
            )
        if self.embedding_size is not None and self.embedding_size < self.vocab_size:
            raise ConfigError(
                f"model.embedding_size={self.embedding_size} is smaller than model.vocab_size={self.vocab_size}; "
                "set it to at least the vocabulary or to null for automatic padding"
            )
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise ConfigError(f"model.clip_qkv={self.clip_qkv} must be positive or null")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"model.attention={self.attention!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        if self.kernels not in KERNEL_BACKENDS:
            raise ConfigError(f"model.kernels={self.kernels!r} is not one of {', '.join(KERNEL_BACKENDS)}")

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count from the shapes alone (no model is built)."""
        hd = self.head_dim
        per_block = (
            self.d_model * (self.n_heads + 2 * self.kv_heads) * hd  # att_proj
            + self.n_heads * hd * self.d_model  # attn_out
            + self.d_model * 2 * self.ffn_hidden_size  # ff_proj
            + self.ffn_hidden_size * self.d_model  # ff_out
        )
        total = self.n_layers * per_block
        if include_embedding:
            embedding = self.padded_vocab_size * self.d_model
            total += embedding if self.weight_tying else 2 * embedding
        return total

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a dict (e.g. a checkpoint's config), refusing keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named OLMo size (see MODEL_PRESETS), optionally with fields overridden."""
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
        return dataclasses.replace(MODEL_PRESETS[name], **overrides)


PIPELINE_SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
DEVICES = ("auto", "cuda", "cpu")


@dataclass
class ParallelConfig:
    """How a model is laid out over ranks: tensor (+ sequence), pipeline and data parallelism."""

    tp: int = 1  # tensor-parallel degree (ranks of a TP group share every layer)
    pp: int = 1  # pipeline-parallel degree (stages on different ranks)
    dp: int | None = None  # data-parallel degree; None infers world_size // (tp * pp)
    vp: int = 1  # virtual pipeline stages per pipeline rank (interleaved schedules)
    sequence_parallel: bool = False  # split LayerNorm regions along the sequence across the TP group
    pp_schedule: str = "1f1b"  # 1f1b | interleaved_1f1b (with vp > 1) | gpipe
    pp_layer_split: list[int] | None = None  # blocks per stage (pp * vp entries); None splits evenly
    reshard_after_forward: bool = True  # FSDP: free gathered parameters after forward (ZeRO-3) or keep (ZeRO-2)
    activation_checkpointing: str = "none"  # none | full (per block) | selective (the attention core)
    device: str = "auto"  # auto (cuda when available) | cuda | cpu

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "vp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name}={value!r} must be a positive integer")
        if self.dp is not None and (not isinstance(self.dp, int) or self.dp < 1):
            raise ConfigError(f"parallel.dp={self.dp!r} must be a positive integer or null (inferred)")
        if self.pp_schedule not in PIPELINE_SCHEDULES:
            raise ConfigError(
                f"parallel.pp_schedule={self.pp_schedule!r} is not one of {', '.join(PIPELINE_SCHEDULES)}"
            )
        interleaved = self.pp_schedule.startswith("interleaved")
        if interleaved and self.vp < 2:
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule} needs parallel.vp >= 2 virtual stages")
        if not interleaved and self.vp > 1:
            raise ConfigError(f"parallel.vp={self.vp} needs an interleaved pp_schedule, not {self.pp_schedule}")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError(
                f"parallel.activation_checkpointing={self.activation_checkpointing!r} is not one of "
                f"{', '.join(ACTIVATION_CHECKPOINTING)}"
            )
        if self.device not in DEVICES:
            raise ConfigError(f"parallel.device={self.device!r} is not one of {', '.join(DEVICES)}")


def _olmo(**values: Any) -> ModelConfig:
    """OLMo's released sizes share its tokenizer (vocab 50280 padded to 50304, eos 50279) and a 2048 context."""
    base: dict[str, Any] = {
        "vocab_size": 50280,
        "embedding_size": 50304,
        "max_sequence_length": 2048,
        "eos_token_id": 50279,
    }
    base.update(values)
    return ModelConfig(**base)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Trains on two CPU cores in minutes; vocabulary of the built-in corpus tokenizer.
    "olmo_tiny": ModelConfig(),
    "olmo_1b": _olmo(d_model=2048, n_layers=16, n_heads=16, ffn_hidden_size=8192, weight_tying=True),
    "olmo_7b": _olmo(d_model=4096, n_layers=32, n_heads=32, ffn_hidden_size=11008, weight_tying=False),
    "olmo_65b": _olmo(d_model=8192, n_layers=80, n_heads=64, ffn_hidden_size=22016, weight_tying=False),
    "olmo_70b": _olmo(
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_hidden_size=28672,
        weight_tying=False,
        clip_qkv=8.0,
        max_sequence_length=4096,
    ),
}
