"""The one resolver of a config against a world size: the start-up checks of every layout, in one place.

`resolve` (or `resolve_layout` for a model and a layout alone) checks the degrees
against the launched ranks and the model, pads the embedding for TP, splits the
blocks into pipeline stages and counts the micro-batches, before any process
group or tensor exists. Training, the step engine and the planner all take their
layout from it, so they cannot disagree about what a config means.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megaolmo.config.schema import Config, Fp8Config, ModelConfig, ParallelConfig
from megaolmo.errors import ConfigError, WorldSizeError


def resolve_dp(parallel: ParallelConfig, world_size: int) -> int:
    """The data-parallel degree, inferred from the world size when not given; checked against it."""
    model_parallel = parallel.tp * parallel.cp * parallel.pp
    dp = parallel.dp if parallel.dp is not None else world_size // model_parallel
    if dp < 1 or model_parallel * dp != world_size:
        needed = model_parallel * max(dp, 1)
        cp = f"parallel.cp={parallel.cp} x " if parallel.cp > 1 else ""
        raise WorldSizeError(
            f"world size {world_size} is not parallel.tp={parallel.tp} x {cp}parallel.pp={parallel.pp} x "
            f"parallel.dp={parallel.dp if parallel.dp is not None else 'inferred'}; launch "
            f"{needed} ranks or change the degrees",
            needed=needed,
        )
    return dp


def stage_layer_counts(n_layers: int, n_stages: int, split: list[int] | None = None) -> list[int]:
    """Blocks per pipeline stage: an even split, or `split[i]` blocks for stage i."""
    if split is None:
        if n_layers % n_stages:
            raise ConfigError(
                f"model.n_layers={n_layers} does not divide into {n_stages} pipeline stages (pp x vp); "
                "change the degrees or give parallel.pp_layer_split"
            )
        return [n_layers // n_stages] * n_stages
    if len(split) != n_stages or sum(split) != n_layers or min(split) < 1:
        raise ConfigError(
            f"parallel.pp_layer_split={split} must have {n_stages} entries (pp x vp), each >= 1, "
            f"summing to model.n_layers={n_layers}"
        )
    return list(split)


@dataclass(frozen=True)
class ResolvedLayout:
    """A model laid out over a world: the model with its embedding padded for TP, the degrees and the stages."""

    model: ModelConfig  # embedding_size set: vocab_size padded to a multiple of 128 x tp unless given
    parallel: ParallelConfig
    dp: int
    stage_layers: tuple[int, ...]  # blocks of each of the pp x vp pipeline stages


def check_async_tp(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Async TP overlaps what inductor's micro-pipeline pass finds in a compiled graph: sequence parallelism's
    all-gather before a column-parallel GEMM and reduce-scatter after a row-parallel one (CUDA is checked where
    the device is known, megaolmo.model.parallelize)."""
    if not model.compile:
        raise ConfigError("parallel.async_tp=true needs model.compile=true (the overlap is a compiler pass)")
    if parallel.tp == 1:
        raise ConfigError("parallel.async_tp=true needs parallel.tp > 1 (there is no TP communication to overlap)")
    if not parallel.sequence_parallel:
        raise ConfigError(
            "parallel.async_tp=true needs parallel.sequence_parallel=true (it overlaps all-gathers and "
            "reduce-scatters, not all-reduces)"
        )


def check_context_parallel(model: ModelConfig, parallel: ParallelConfig) -> None:
    """What ring attention (megaolmo.parallel.context) computes its blocks with: torch's fused SDPA kernels,
    which return each block's log-sum-exp, outside a compiled graph."""
    if model.attention != "sdpa":
        raise ConfigError(
            f"parallel.cp={parallel.cp} computes attention as a ring of torch SDPA blocks, not model.attention="
            f"{model.attention}; set model.attention=sdpa"
        )
    if model.compile:
        raise ConfigError(
            f"parallel.cp={parallel.cp} with model.compile=true: the ring's send/recv inside the attention would "
            "break each compiled block's graph; set model.compile=false"
        )


def sequence_multiple(parallel: ParallelConfig) -> int:
    """What every sequence length of a layout is a multiple of: 2 x cp chunks under CP, each CP rank's share
    split again over tp under SP."""
    tp = parallel.tp if parallel.sequence_parallel else 1
    if parallel.cp == 1:
        return tp
    return parallel.cp * math.lcm(2, tp)


def check_context_split(parallel: ParallelConfig, seq_len: int) -> None:
    """A sequence splits into 2 x cp equal chunks (each CP rank holds two, load-balanced), and a CP rank's
    share into tp equal parts under sequence parallelism."""
    cp, tp = parallel.cp, parallel.tp
    if seq_len % (2 * cp):
        raise ConfigError(
            f"sequence length {seq_len} is not divisible by 2 x parallel.cp={cp} (each CP rank holds two equal "
            "chunks of it); change trainer.seq_len or parallel.cp"
        )
    if parallel.sequence_parallel and (seq_len // cp) % tp:
        raise ConfigError(
            f"a CP rank's {seq_len // cp} tokens (sequence length {seq_len} / parallel.cp={cp}) are not divisible "
            f"by parallel.tp={tp} (sequence parallelism); change trainer.seq_len"
        )


def resolve_layout(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> ResolvedLayout:
    """Check a layout against the world size and the model before any group or tensor exists."""
    dp = resolve_dp(parallel, world_size)
    tp = parallel.tp
    if model.n_heads % tp:
        raise ConfigError(f"model.n_heads={model.n_heads} is not divisible by parallel.tp={tp}")
    if model.kv_heads % tp:
        raise ConfigError(
            f"model.n_kv_heads={model.kv_heads} is not divisible by parallel.tp={tp}; each TP rank needs whole "
            "key/value heads (megaolmo does not replicate them): use a tp that divides n_kv_heads"
        )
    for name in ("ffn_hidden_size", "d_model"):
        if getattr(model, name) % tp:
            raise ConfigError(f"model.{name}={getattr(model, name)} is not divisible by parallel.tp={tp}")
    if parallel.vp > 1 and parallel.pp == 1:
        raise ConfigError(f"parallel.vp={parallel.vp} needs parallel.pp > 1")
    if model.compile and model.linear == "te":
        raise ConfigError(
            "model.compile=true with model.linear=te: torch.compile does not trace Transformer Engine's modules; "
            "use model.linear=torchao (FP8 that compiles) or model.compile=false"
        )
    if model.linear == "te" and parallel.activation_checkpointing == "full":
        # torch's checkpoint recomputes a block in backward, outside te.fp8_autocast (TE issue 415);
        # selective recomputes the attention core alone, which has no TE GEMM.
        raise ConfigError(
            "parallel.activation_checkpointing=full with model.linear=te recomputes outside fp8_autocast; "
            "use activation_checkpointing=selective or none, or model.linear=torchao"
        )
    if parallel.async_tp:
        check_async_tp(model, parallel)
    if parallel.cp > 1:
        check_context_parallel(model, parallel)
    stage_layers = stage_layer_counts(model.n_layers, parallel.pp * parallel.vp, parallel.pp_layer_split)
    if model.embedding_size is None:
        multiple = 128 * tp
        model = dataclasses.replace(model, embedding_size=-(-model.vocab_size // multiple) * multiple)
    elif model.embedding_size % tp:
        raise ConfigError(
            f"model.embedding_size={model.embedding_size} is not divisible by parallel.tp={tp}; "
            "set it to a multiple of tp, or to null to pad automatically"
        )
    return ResolvedLayout(model=model, parallel=parallel, dp=dp, stage_layers=tuple(stage_layers))


def check_fp8_all_gather(linear: str, fp8: Fp8Config, dp: int) -> None:
    """fp8.all_gather needs torchao's FP8 linears (whose weights it gathers) and FSDP2 (dp > 1, which gathers)."""
    if not fp8.all_gather:
        return
    if linear != "torchao":
        raise ConfigError(
            f"fp8.all_gather=true all-gathers torchao's FP8 weights, not model.linear={linear}'s; "
            "set model.linear=torchao or fp8.all_gather=false"
        )
    if dp == 1:
        raise ConfigError("fp8.all_gather=true needs data parallelism (dp > 1, FSDP2); set fp8.all_gather=false")


def microbatches_in(parallel: ParallelConfig, rows: int, micro_batch_size: int, seq_len: int) -> int:
    """Micro-batches in a DP rank's `rows` sequences, after the checks every layout needs."""
    if rows % micro_batch_size:
        raise ConfigError(
            f"this rank's batch of {rows} sequences is not divisible by micro_batch_size={micro_batch_size}"
        )
    if parallel.cp > 1:
        check_context_split(parallel, seq_len)
    elif parallel.sequence_parallel and seq_len % parallel.tp:
        raise ConfigError(
            f"sequence length {seq_len} is not divisible by parallel.tp={parallel.tp} (sequence parallelism)"
        )
    n_microbatches = rows // micro_batch_size
    if parallel.pp > 1 and n_microbatches < parallel.pp:
        raise ConfigError(
            f"{n_microbatches} micro-batches per rank cannot fill {parallel.pp} pipeline stages; "
            "raise the global batch or lower micro_batch_size"
        )
    return n_microbatches


def microbatches_per_rank(
    parallel: ParallelConfig, *, dp: int, global_batch_size: int, micro_batch_size: int, seq_len: int
) -> int:
    """Micro-batches each DP rank runs per step: a run's batch checked against its layout."""
    if global_batch_size % (micro_batch_size * dp):
        raise ConfigError(
            f"trainer.global_batch_size={global_batch_size} is not divisible by "
            f"trainer.micro_batch_size={micro_batch_size} x dp={dp}"
        )
    return microbatches_in(parallel, global_batch_size // dp, micro_batch_size, seq_len)


@dataclass(frozen=True)
class ResolvedRun:
    """A training config resolved against the launched ranks: what every start-up check derived."""

    layout: ResolvedLayout
    seq_len: int  # tokens per training sequence
    microbatches: int  # micro-batches per DP rank per step

    @property
    def model(self) -> ModelConfig:
        return self.layout.model

    @property
    def dp(self) -> int:
        return self.layout.dp


def resolve_warmup_steps(config: Config, seq_len: int) -> int:
    """The warmup in optimizer steps: optim.warmup_steps, or optim.warmup_tokens over the tokens of a step,
    rounded up (OLMo-2 counts its warmup in tokens: 8388608000 = 2000 steps of 1024 x 4096).

    A warmup in both is refused unless they agree, so a step count left from another optim group cannot
    silently win over (or lose to) a token count; agreeing also makes resolving a resolved config a no-op.
    """
    optim, tokens_per_step = config.optim, config.trainer.global_batch_size * seq_len
    if optim.warmup_tokens is None:
        return optim.warmup_steps
    steps = -(-optim.warmup_tokens // tokens_per_step)
    if optim.warmup_steps is not None and optim.warmup_steps != steps:
        raise ConfigError(
            f"optim.warmup_tokens={optim.warmup_tokens} ({steps} steps of {tokens_per_step} tokens) and "
            f"optim.warmup_steps={optim.warmup_steps} both set the warmup; set optim.warmup_steps=null to count it "
            "in tokens, or optim.warmup_tokens=null to count it in steps"
        )
    return steps


def resolve(config: Config, world_size: int) -> ResolvedRun:
    """Every start-up check of a training run on `world_size` ranks, before any group or tensor exists.

    The one field it writes back is optim.warmup_steps, derived from optim.warmup_tokens when that is set:
    the schedule (megaolmo.train.optim.learning_rate) reads steps, and the run's logged config then shows
    the warmup that ran.
    """
    layout = resolve_layout(config.model, config.parallel, world_size)
    check_fp8_all_gather(config.model.linear, config.fp8, layout.dp * config.parallel.cp)  # FSDP shards over dp x cp
    if config.model.attention == "flash" and config.trainer.precision == "fp32":
        raise ConfigError(
            "model.attention=flash needs fp16/bf16 activations, not trainer.precision=fp32; "
            "set trainer.precision=bf16 or model.attention=sdpa"
        )
    seq_len = config.seq_len()
    config.optim.warmup_steps = resolve_warmup_steps(config, seq_len)
    microbatches = microbatches_per_rank(
        config.parallel,
        dp=layout.dp,
        global_batch_size=config.trainer.global_batch_size,
        micro_batch_size=config.trainer.micro_batch_size,
        seq_len=seq_len,
    )
    return ResolvedRun(layout=layout, seq_len=seq_len, microbatches=microbatches)
