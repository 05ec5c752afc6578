"""The typed configs: every key in a dataclass with a type, a default and a one-line comment.

Hydra composes conf/ over `Config` (registered as `megaolmo_schema`), so an
unknown key or a wrong type fails before anything runs; each dataclass checks
its own fields in `__post_init__` with one line that names the bad value.
Checks across fields and against the launched ranks live in resolve.py.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaolmo.errors import ConfigError

ARCHITECTURES = ("olmo1", "olmo2", "olmo3")
INIT_FUNCTIONS = ("auto", "mitchell", "normal")
LAYER_TYPES = ("sliding_attention", "full_attention")
ROPE_SCALINGS = ("yarn",)
ATTENTION_BACKENDS = ("sdpa", "flash")
KERNEL_BACKENDS = ("auto", "torch", "triton")
LINEAR_BACKENDS = ("torch", "torchao", "te")


@dataclass
class ModelConfig:
    """An OLMo: decoder-only, SwiGLU, RoPE, no biases; the block of OLMo-1, OLMo-2 or OLMo-3.

    - olmo1: `x + attn(LN(x))`, `x + mlp(LN(x))` with a parameter-free LayerNorm.
    - olmo2: `x + RMSNorm(attn(x))`, `x + RMSNorm(mlp(x))` with learned weights, and QK-norm (an RMSNorm
      over the whole projected q and the whole projected k, before RoPE).
    - olmo3: the olmo2 block with sliding-window attention on the layers `layer_types` names (three of
      every four by default), and YaRN RoPE scaling on the full-attention layers when `rope_scaling=yarn`.
    """

    arch: str = "olmo1"  # olmo1 | olmo2 | olmo3 (the block; see the class docstring)
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
    layer_norm_eps: float = 1e-5  # epsilon of every norm (OLMo-1's LayerNorm 1e-5; OLMo-2/3's RMSNorm 1e-6)
    sliding_window: int | None = None  # olmo3: keys a query sees on sliding layers, itself included (4096)
    layer_types: list[str] | None = None  # olmo3, per block: sliding_attention | full_attention; None: every 4th full
    rope_scaling: str | None = None  # null | yarn (HF rope_type; on full-attention layers only, as HF Olmo3)
    rope_scaling_factor: float = 1.0  # YaRN: context extension factor
    rope_original_max_position: int | None = None  # YaRN: the context the model was trained at before scaling
    yarn_beta_fast: float = 32.0  # YaRN: rotations above which a frequency is kept (extrapolated)
    yarn_beta_slow: float = 1.0  # YaRN: rotations below which a frequency is interpolated
    yarn_attention_factor: float | None = None  # YaRN: cos/sin scale; None is 0.1 ln(factor) + 1
    init_fn: str = "auto"  # mitchell (OLMo-1) | normal (OLMo-2/3: every weight N(0, init_std) cut at 3 std) | auto
    init_std: float = 0.02  # std of init_fn=normal
    eos_token_id: int = (
        0  # end-of-document token appended after every document (OLMo-1's tokenizer: 50279; dolma2: 100257)
    )
    pad_token_id: int = 1  # padding token (never trained on)
    attention: str = "sdpa"  # sdpa (torch scaled_dot_product_attention) | flash (flash-attn)
    linear: str = "torch"  # the local GEMM of every block linear: torch | torchao (FP8) | te (Transformer Engine FP8)
    kernels: str = "auto"  # RoPE/SwiGLU/norms: triton (fused kernels) | torch (references) | auto (triton on CUDA)
    compile: bool = False  # torch.compile each transformer block (inductor); how it runs, not the weights

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
    def norm_after(self) -> bool:
        """Whether the block normalizes each sublayer's output (OLMo-2/3) instead of its input (OLMo-1)."""
        return self.arch != "olmo1"

    @property
    def qk_norm(self) -> bool:
        """Whether q and k are RMS-normalized (over all heads) before RoPE: OLMo-2 and OLMo-3."""
        return self.arch != "olmo1"

    @property
    def init_method(self) -> str:
        """The initialization that runs: `init_fn`, with auto meaning each generation's own."""
        if self.init_fn != "auto":
            return self.init_fn
        return "mitchell" if self.arch == "olmo1" else "normal"

    @property
    def block_layer_types(self) -> list[str]:
        """Each block's attention: full everywhere, or OLMo-3's (Hugging Face's) pattern of `layer_types`."""
        if self.sliding_window is None:
            return ["full_attention"] * self.n_layers
        if self.layer_types is not None:
            return list(self.layer_types)
        return ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(self.n_layers)]

    def attention_window(self, layer: int) -> int | None:
        """Keys a query of block `layer` sees, itself included, or None for full causal attention."""
        return self.sliding_window if self.block_layer_types[layer] == "sliding_attention" else None

    def rope_scaled(self, layer: int) -> bool:
        """Whether block `layer` takes the YaRN-scaled RoPE (full-attention layers, as HF Olmo3)."""
        return self.rope_scaling is not None and self.attention_window(layer) is None

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
        if self.linear not in LINEAR_BACKENDS:
            raise ConfigError(f"model.linear={self.linear!r} is not one of {', '.join(LINEAR_BACKENDS)}")
        if self.kernels not in KERNEL_BACKENDS:
            raise ConfigError(f"model.kernels={self.kernels!r} is not one of {', '.join(KERNEL_BACKENDS)}")
        if self.init_fn not in INIT_FUNCTIONS:
            raise ConfigError(f"model.init_fn={self.init_fn!r} is not one of {', '.join(INIT_FUNCTIONS)}")
        if not self.init_std > 0:
            raise ConfigError(f"model.init_std={self.init_std} must be positive")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"model.compile={self.compile!r} must be true or false")
        self._validate_architecture()

    def _validate_architecture(self) -> None:
        """The generation-specific fields: windows only on OLMo-3, a layer type per block, YaRN's parameters."""
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"model.arch={self.arch!r} is not one of {', '.join(ARCHITECTURES)}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"model.layer_norm_eps={self.layer_norm_eps} must be positive")
        if self.arch != "olmo3" and (self.sliding_window is not None or self.layer_types is not None):
            raise ConfigError(
                f"model.sliding_window/layer_types are OLMo-3's (model.arch={self.arch}); set model.arch=olmo3 "
                "or null them"
            )
        if self.arch == "olmo3" and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError(
                f"model.sliding_window={self.sliding_window!r} must be a positive integer for model.arch=olmo3 "
                "(OLMo-3 uses 4096)"
            )
        if self.layer_types is not None and (
            len(self.layer_types) != self.n_layers or set(self.layer_types) - set(LAYER_TYPES)
        ):
            raise ConfigError(
                f"model.layer_types={list(self.layer_types)} must give one of {', '.join(LAYER_TYPES)} for "
                f"each of the model.n_layers={self.n_layers} blocks, or be null (every fourth full)"
            )
        if self.rope_scaling is None:
            return
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ConfigError(
                f"model.rope_scaling={self.rope_scaling!r} is not one of {', '.join(ROPE_SCALINGS)} (or null)"
            )
        if self.rope_scaling_factor < 1:
            raise ConfigError(f"model.rope_scaling_factor={self.rope_scaling_factor} must be at least 1 for YaRN")
        if not isinstance(self.rope_original_max_position, int) or self.rope_original_max_position < 1:
            raise ConfigError(
                f"model.rope_original_max_position={self.rope_original_max_position!r} must be the positive "
                "context length before YaRN scaling (e.g. 8192)"
            )

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count from the shapes alone (no model is built)."""
        hd = self.head_dim
        per_block = (
            self.d_model * (self.n_heads + 2 * self.kv_heads) * hd  # att_proj
            + self.n_heads * hd * self.d_model  # attn_out
            + self.d_model * 2 * self.ffn_hidden_size  # ff_proj
            + self.ffn_hidden_size * self.d_model  # ff_out
        )
        if self.norm_after:  # OLMo-2/3: attn_norm and ff_norm weights, q_norm and k_norm over all heads
            per_block += 2 * self.d_model + (self.n_heads + self.kv_heads) * hd
        total = self.n_layers * per_block + (self.d_model if self.norm_after else 0)  # ln_f's weight
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
        """A named OLMo size (conf/model/NAME.yaml, the same files Hydra composes), with fields overridden."""
        path = CONF_DIR / "model" / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(model_presets())}")
        from omegaconf import OmegaConf  # the configs' own reader; the model itself needs only torch

        values = OmegaConf.to_container(OmegaConf.load(path))
        return cls(**{**values, **overrides})


def _conf_dir() -> Path:
    """The Hydra tree: installed as megaolmo/conf by a wheel, at the top of a checkout otherwise."""
    package = Path(__file__).resolve().parent.parent  # megaolmo/
    installed = package / "conf"
    return installed if installed.is_dir() else package.parent / "conf"


CONF_DIR = _conf_dir()


def model_presets() -> list[str]:
    """Names of the model presets in conf/model/."""
    return sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))


PIPELINE_SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
DEVICES = ("auto", "cuda", "cpu")


@dataclass
class ParallelConfig:
    """How a model is laid out over ranks: tensor (+ sequence), context, pipeline and data parallelism."""

    tp: int = 1  # tensor-parallel degree (ranks of a TP group share every layer)
    pp: int = 1  # pipeline-parallel degree (stages on different ranks)
    dp: int | None = None  # data-parallel degree; None infers world_size // (tp * cp * pp)
    cp: int = (
        1  # context-parallel degree: each sequence split over cp ranks (ring attention, megaolmo.parallel.context)
    )
    vp: int = 1  # virtual pipeline stages per pipeline rank (interleaved schedules)
    sequence_parallel: bool = False  # split the norm regions along the sequence across the TP group
    pp_schedule: str = "1f1b"  # 1f1b | interleaved_1f1b (with vp > 1) | gpipe
    pp_layer_split: list[int] | None = None  # blocks per stage (pp * vp entries); None splits evenly
    reshard_after_forward: bool = True  # FSDP: free gathered parameters after forward (ZeRO-3) or keep (ZeRO-2)
    activation_checkpointing: str = "none"  # none | full (per block) | selective (the attention core)
    device: str = "auto"  # auto (cuda when available) | cuda | cpu
    async_tp: bool = False  # CUDA, model.compile, tp > 1, SP: overlap SP's all-gathers/reduce-scatters with GEMMs

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "vp", "cp"):
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
        if not isinstance(self.async_tp, bool):
            raise ConfigError(f"parallel.async_tp={self.async_tp!r} must be true or false")


@dataclass
class OptimConfig:
    """AdamW and its schedules, with OLMo's defaults (OLMo-1B)."""

    lr: float = 4e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-5  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay
    decay_embeddings: bool = False  # OLMo-1B/7B exempt the embedding from weight decay; 65B/70B decay it
    scheduler: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int | None = 2000  # linear warmup from warmup_start x lr to lr; null: from warmup_tokens
    warmup_tokens: int | None = None  # the warmup in tokens (OLMo-2): ceil(tokens / tokens per step) steps
    warmup_start: float = 0.1  # OLMo's warmup starts at 0.1 x lr, not at 0
    alpha_f: float = 0.1  # final learning rate as a fraction of lr (cosine and linear)
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; null disables clipping
    clip_warmup_steps: int = 0  # during the first steps clip at max_grad_norm x clip_warmup_factor
    clip_warmup_factor: float = 1.0  # see clip_warmup_steps
    fused: bool | None = None  # torch's fused AdamW; null: on CUDA only

    def __post_init__(self) -> None:
        if self.scheduler not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.scheduler={self.scheduler!r} is not one of cosine, linear, constant")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be positive")
        # One warmup length, in steps or in tokens: resolve() turns tokens into steps once the batch is known
        # (and accepts the steps it wrote itself), so a warmup in both is refused there, not guessed at.
        if self.warmup_tokens is not None and (not isinstance(self.warmup_tokens, int) or self.warmup_tokens < 0):
            raise ConfigError(f"optim.warmup_tokens={self.warmup_tokens!r} must be a token count >= 0 or null")
        if self.warmup_steps is None and self.warmup_tokens is None:
            raise ConfigError(
                "optim.warmup_steps=null needs optim.warmup_tokens (the warmup in tokens); set one of the two"
            )
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0 (or null with warmup_tokens)")


@dataclass
class InstanceFilterConfig:
    """OLMo's repetition filter (its InstanceFilterConfig, same defaults): an instance in which a pattern of
    min_period..max_period tokens repeats max_count times in a row trains on none of its targets."""

    enabled: bool = False  # OLMo's instance_filter is off (None) unless configured
    repetition_max_period: int = 13  # longest pattern (in tokens) searched for
    repetition_min_period: int = 1  # shortest pattern searched for
    repetition_max_count: int = 32  # repeats in a row that drop the instance

    def __post_init__(self) -> None:
        if not isinstance(self.repetition_min_period, int) or self.repetition_min_period < 1:
            raise ConfigError(
                f"data.instance_filter.repetition_min_period={self.repetition_min_period!r} must be at least 1"
            )
        if not isinstance(self.repetition_max_period, int) or self.repetition_max_period < self.repetition_min_period:
            raise ConfigError(
                f"data.instance_filter.repetition_max_period={self.repetition_max_period!r} must be an integer "
                f">= data.instance_filter.repetition_min_period={self.repetition_min_period}"
            )
        if not isinstance(self.repetition_max_count, int) or self.repetition_max_count < 1:
            raise ConfigError(
                f"data.instance_filter.repetition_max_count={self.repetition_max_count!r} must be at least 1"
            )


@dataclass
class DataSourceConfig:
    """One source of a mixture (`data.sources`, megaolmo.data.mixture): its memmaps and its share of the run."""

    name: str = ""  # names the source in errors, the start-up table and tokens/<name>; letters, digits, _ . -
    paths: list[str] = field(default_factory=list)  # its prepared token memmaps (files or directories)
    target_ratio: float = 0.0  # fraction of the run's tokens read from this source; the sources' ratios sum to 1
    max_repetition: float = 1.0  # at most this many passes over the source's instances (1: none read twice)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(self.name)):
            raise ConfigError(
                f"data.sources: name {self.name!r} must be non-empty letters, digits, '_', '.' or '-' "
                "(it names the source in metrics)"
            )
        if not self.paths:
            raise ConfigError(f"data.sources[{self.name}] has no paths; give its prepared memmaps (files or dirs)")
        if not 0.0 < self.target_ratio <= 1.0:
            raise ConfigError(
                f"data.sources[{self.name}].target_ratio={self.target_ratio} must be in (0, 1]; "
                "drop a source the run reads nothing from"
            )
        if not self.max_repetition >= 1.0:
            raise ConfigError(
                f"data.sources[{self.name}].max_repetition={self.max_repetition} must be >= 1 "
                "(1: no instance read twice)"
            )


@dataclass
class DataConfig:
    """Token memmaps to train on; with no paths, the built-in corpus (the Python standard library)."""

    paths: list[str] = field(default_factory=list)  # token memmaps (files or directories); empty: built-in
    valid_paths: list[str] = field(default_factory=list)  # held-out memmaps, evaluated in the loop per source/domain
    tokenizer: str | None = None  # tokenizer JSON the model expects; the data's fingerprint must match
    dtype: str | None = None  # memmap dtype for files without metadata.json (OLMo's own: uint16)
    builtin_vocab_size: int = 4096  # vocabulary of the built-in corpus's BPE tokenizer
    cache_dir: str | None = None  # where the built-in corpus is prepared (default ~/.cache/megaolmo)
    label_mask_paths: list[str] = field(default_factory=list)  # np.bool_ masks (True: a target), one per token file
    instance_filter: InstanceFilterConfig = field(default_factory=InstanceFilterConfig)  # OLMo's repetition filter
    sources: list[DataSourceConfig] = field(default_factory=list)  # a mixture instead of paths (data/mixture.py)
    document_masking: bool = False  # attend within each EOS-ended document of an instance; RoPE restarts in each


@dataclass
class TrainerConfig:
    """The loop: how many steps on how large batches, precision, logging, evaluation, saving."""

    max_steps: int = 600  # optimizer steps; defines the LR schedule
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    seq_len: int | None = None  # tokens per sequence; null: the model's max_sequence_length
    precision: str = "fp32"  # fp32 | bf16 (bf16 compute, fp32 master weights and gradient reduction)
    tf32: bool = True  # on CUDA, fp32 matmuls and convolutions in TF32 (10-bit mantissa, faster); CPU: no-op
    seed: int = 0  # model init and data order
    run_dir: str = "${hydra:runtime.output_dir}"  # metrics, plots and weights; shared by every rank
    stop_at: int | None = None  # end this leg at step N with a checkpoint; the schedule still spans max_steps
    save_interval: int | None = None  # a sharded checkpoint every N steps (and at stop_at); null: none
    keep_last: int = 3  # checkpoints kept besides those kept for good
    keep_every: int | None = None  # keep every checkpoint whose step is a multiple of this, for good
    resume: str = "auto"  # auto (latest in run_dir/checkpoints, if any) | none | a checkpoint directory
    init_from: str | None = None  # a fresh run starts from these weights (any checkpoint, e.g. a converted HF model)
    eval_interval: int = 100  # evaluate on the held-out split every N steps (0 disables)
    eval_batches: int = 8  # global batches' worth of held-out sequences per source per evaluation
    downstream_tasks: list[str] = field(default_factory=list)  # task files (megaolmo.eval) scored every evaluation
    downstream_limit: int | None = None  # examples per task in the loop; null: all
    log_interval: int = 10  # write metrics every N steps
    z_loss: float = 0.0  # z-loss multiplier (OLMo-2 uses 1e-5)
    loss_chunk_tokens: int | None = None  # the loss forms this many tokens' logits at a time; null: a micro-batch's
    nonfinite: str = "skip"  # a NaN/inf loss or gradient: skip the step | stop the run
    progress: bool = True  # a progress bar on rank 0
    tensorboard: bool = True  # TensorBoard scalars under run_dir/tensorboard
    wandb_project: str | None = None  # also log to Weights & Biases (needs wandb installed)

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"trainer.precision={self.precision!r} is not one of fp32, bf16")
        if self.nonfinite not in ("skip", "stop"):
            raise ConfigError(f"trainer.nonfinite={self.nonfinite!r} is not one of skip, stop")
        if self.stop_at is not None and not 0 < self.stop_at <= self.max_steps:
            raise ConfigError(
                f"trainer.stop_at={self.stop_at} must be between 1 and trainer.max_steps={self.max_steps}"
            )
        for name in ("max_steps", "global_batch_size", "micro_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be at least 1")
        chunk = self.loss_chunk_tokens
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ConfigError(
                f"trainer.loss_chunk_tokens={chunk!r} must be a positive number of tokens (e.g. 4096) or null"
            )


@dataclass
class ClusterConfig:
    """The machines: what a device can do (for MFU) and how many there are."""

    name: str = "local_cpu"  # a label for logs
    device_name: str | None = None  # e.g. H100-SXM; null: whatever torch reports
    peak_tflops: float | None = None  # dense bf16 (fp32 on CPU) TFLOP/s per device; null: measured at start
    gpus_per_node: int = 0  # 0 on CPU-only machines
    nodes: int = 1  # machines in the job
    memory_gib: float | None = None  # memory per device (GiB) the planner fits into; null: this machine's RAM
    memory_reserve_gib: float = 0.0  # per device, kept free by the planner: CUDA context, NCCL buffers, fragmentation
    hbm_gbps: float | None = None  # device memory bandwidth (GB/s), for the planner's roofline
    intra_node_gbps: float | None = None  # per-device bandwidth to a device of the same node (GB/s, one direction)
    inter_node_gbps: float | None = None  # per-device bandwidth to another node (GB/s, one direction)
    matmul_efficiency: float = 0.7  # fraction of peak_tflops a large GEMM (and flash attention) reaches


@dataclass
class Fp8Config:
    """FP8 recipes, used when model.linear is torchao or te."""

    torchao_recipe: str = "tensorwise"  # torchao scaling: tensorwise | rowwise | rowwise_with_gw_hp
    te_recipe: str = "delayed"  # Transformer Engine scaling: delayed | current (tensorwise) | mxfp8 (Blackwell)
    fp8_format: str = "HYBRID"  # HYBRID (E4M3 forward, E5M2 gradients) | E4M3
    margin: int = 0  # delayed scaling: scale margin (powers of two)
    amax_history_len: int = 1024  # delayed scaling: steps of amax history
    amax_compute_algo: str = "max"  # delayed scaling: max | most_recent over the history
    keep_first_last_blocks_bf16: bool = False  # the first and last blocks keep high-precision GEMMs
    emulate: str = "auto"  # torchao: auto (emulate where there is no FP8 GEMM: CPU, GPUs below sm_89) | true | false
    all_gather: bool = False  # torchao, dp > 1: FSDP2 all-gathers the FP8 block weights in float8 (half bf16's bytes)

    def __post_init__(self) -> None:
        if str(self.emulate).lower() in ("auto", "true", "false"):  # the command line's `true` arrives as "True"
            self.emulate = str(self.emulate).lower()
        choices = {
            "torchao_recipe": ("tensorwise", "rowwise", "rowwise_with_gw_hp"),
            "te_recipe": ("delayed", "current", "mxfp8"),
            "fp8_format": ("HYBRID", "E4M3"),
            "amax_compute_algo": ("max", "most_recent"),
            "emulate": ("auto", "true", "false"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"fp8.{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.all_gather and self.torchao_recipe != "tensorwise":
            # torchao's float8 all-gather casts each weight with one scale (precomputed after the step)
            raise ConfigError(
                f"fp8.all_gather=true needs fp8.torchao_recipe=tensorwise, not {self.torchao_recipe}; "
                "set fp8.all_gather=false or fp8.torchao_recipe=tensorwise"
            )


@dataclass
class Config:
    """Everything one training run needs; composed by Hydra from conf/."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)

    def seq_len(self) -> int:
        """Tokens per training sequence: trainer.seq_len, or the model's maximum when unset."""
        seq_len = self.trainer.seq_len or self.model.max_sequence_length
        if seq_len > self.model.max_sequence_length:
            raise ConfigError(
                f"trainer.seq_len={seq_len} exceeds model.max_sequence_length={self.model.max_sequence_length}"
            )
        return seq_len
