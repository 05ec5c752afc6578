"""What is planned: a layout (degrees, micro-batch, recompute) for a workload (model, batch, precision), and
what each pipeline rank then holds, derived with megaolmo's own validation and stage split."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from megaolmo.config import Config, ModelConfig, ParallelConfig, microbatches_per_rank, resolve_dp, resolve_layout
from megaolmo.errors import ConfigError
from megaolmo.model.flops import flops_per_token
from megaolmo.parallel.pipeline import stage_layer_ranges, stages_of_rank

RECOMPUTE_NAMES = {"none": "no recompute", "selective": "selective recompute", "full": "full recompute"}


@dataclass(frozen=True)
class Workload:
    """What a step computes, independent of the layout: the model, the batch, the precision and the device."""

    model: ModelConfig
    seq_len: int
    global_batch_size: int
    bf16: bool  # trainer.precision == bf16
    device: str  # cuda | cpu
    kernels: str  # triton | torch: what model.kernels resolves to on `device`
    fused_adam: bool  # torch's fused AdamW (no temporaries) or the foreach path
    decay_embeddings: bool  # the embedding sits in the decayed parameter group (one optimizer group)
    loss_chunk_tokens: int | None = None  # trainer.loss_chunk_tokens: the loss's logits a chunk at a time
    fp8_all_gather: bool = False  # fp8.all_gather with torchao: FSDP gathers the block linears in float8
    document_masking: bool = False  # data.document_masking: attention within each document of a row

    @classmethod
    def from_config(cls, config: Config, device: str) -> Workload:
        model, trainer = config.model, config.trainer
        seq_len = config.seq_len()
        kernels = model.kernels if model.kernels != "auto" else ("triton" if device == "cuda" else "torch")
        fused = config.optim.fused if config.optim.fused is not None else device == "cuda"
        return cls(
            model=model,
            seq_len=seq_len,
            global_batch_size=trainer.global_batch_size,
            bf16=trainer.precision == "bf16",
            device=device,
            kernels=kernels,
            fused_adam=fused,
            decay_embeddings=config.optim.decay_embeddings,
            loss_chunk_tokens=trainer.loss_chunk_tokens,
            fp8_all_gather=config.fp8.all_gather and model.linear == "torchao",
            document_masking=config.data.document_masking,
        )

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @cached_property  # the search asks for it once per layout; OLMo-3's windows make it O(n_layers^2)
    def model_flops_per_step(self) -> float:
        """Model FLOPs of one optimizer step, counted as megaolmo.model.flops counts them for MFU."""
        return flops_per_token(self.model, self.seq_len) * self.tokens_per_step


@dataclass(frozen=True)
class Layout:
    """One way to lay the workload over ranks: the parallel degrees, the micro-batch and what is recomputed."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: int = 1
    cp: int = 1  # parallel.cp: each sequence split over cp ranks (two zig-zag chunks each), ring attention
    micro_batch_size: int = 1
    sequence_parallel: bool = False
    activation_checkpointing: str = "none"
    reshard_after_forward: bool = True
    pp_schedule: str = "1f1b"
    pp_layer_split: tuple[int, ...] | None = None
    async_tp: bool = False  # parallel.async_tp: SP's collectives overlapped with the GEMMs (timing.ASYNC_TP_HIDDEN)

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def shard_degree(self) -> int:
        """Ranks FSDP2 shards the weights, gradients and AdamW states over: DP and CP together ("dp_cp")."""
        return self.dp * self.cp

    def parallel_config(self) -> ParallelConfig:
        split = list(self.pp_layer_split) if self.pp_layer_split is not None else None
        return ParallelConfig(
            tp=self.tp,
            pp=self.pp,
            dp=self.dp,
            vp=self.vp,
            cp=self.cp,
            sequence_parallel=self.sequence_parallel,
            pp_schedule=self.pp_schedule,
            pp_layer_split=split,
            reshard_after_forward=self.reshard_after_forward,
            activation_checkpointing=self.activation_checkpointing,
            async_tp=self.async_tp,
        )

    def describe(self) -> str:
        """One line, e.g. `tp8 (SP) x pp8 (interleaved_1f1b, vp2) x dp8, micro-batch 1, selective recompute, ZeRO-3`;
        a `cp4 x` between TP and PP under context parallelism."""
        tp = f"tp{self.tp}" + (" (SP)" if self.sequence_parallel else "")
        if self.cp > 1:
            tp += f" x cp{self.cp}"
        pp = f"pp{self.pp}"
        if self.pp > 1:
            pp += f" ({self.pp_schedule}" + (f", vp{self.vp})" if self.vp > 1 else ")")
        zero = ("ZeRO-3" if self.reshard_after_forward else "ZeRO-2") if self.shard_degree > 1 else "no DP sharding"
        recompute = RECOMPUTE_NAMES[self.activation_checkpointing]
        return f"{tp} x {pp} x dp{self.dp}, micro-batch {self.micro_batch_size}, {recompute}, {zero}"

    @classmethod
    def from_config(cls, config: Config, world_size: int) -> Layout:
        """The layout megaolmo.train would run on `world_size` ranks with this config."""
        parallel = config.parallel
        split = tuple(parallel.pp_layer_split) if parallel.pp_layer_split is not None else None
        return cls(
            tp=parallel.tp,
            pp=parallel.pp,
            dp=resolve_dp(parallel, world_size),
            vp=parallel.vp,
            cp=parallel.cp,
            micro_batch_size=config.trainer.micro_batch_size,
            sequence_parallel=parallel.sequence_parallel,
            activation_checkpointing=parallel.activation_checkpointing,
            reshard_after_forward=parallel.reshard_after_forward,
            pp_schedule=parallel.pp_schedule,
            pp_layer_split=split,
            async_tp=parallel.async_tp,
        )


@dataclass(frozen=True)
class PipelineRank:
    """What one pipeline rank holds: its stage modules' blocks and the embedding, head and loss at the ends."""

    pp_rank: int
    chunk_layers: tuple[int, ...]  # blocks of each of this rank's stage modules (vp of them)
    first: bool  # runs stage 0: embeds the token ids
    last: bool  # runs the last stage: final norm, logits and loss
    embedding_copies: int  # wte tensors held: the input embedding and/or a tied head's copy
    head: bool  # an untied output head

    @property
    def layers(self) -> int:
        return sum(self.chunk_layers)


class Placement:
    """A layout checked against a workload the way megaolmo checks it at start-up, with what follows from it."""

    def __init__(self, work: Workload, layout: Layout) -> None:
        self.work, self.layout = work, layout
        resolved = resolve_layout(work.model, layout.parallel_config(), layout.world_size)
        self.model = resolved.model
        self.n_microbatches = microbatches_per_rank(
            resolved.parallel,
            dp=resolved.dp,
            global_batch_size=work.global_batch_size,
            micro_batch_size=layout.micro_batch_size,
            seq_len=work.seq_len,
        )
        if layout.vp > 1 and self.n_microbatches % self.rounds:
            raise ConfigError(
                f"interleaved 1F1B needs the {self.n_microbatches} micro-batches per rank to be a multiple of "
                f"{self.rounds} rounds of {layout.pp}"
            )
        self.stage_layers = list(resolved.stage_layers)

    @cached_property
    def windows(self) -> list[int | None]:
        """Each block's attention window (None: full causal), as ModelConfig.attention_window gives it."""
        return [self.model.attention_window(i) for i in range(self.model.n_layers)]

    @property
    def local_seq_len(self) -> int:
        """Tokens of each sequence on one rank: seq_len / cp (two zig-zag chunks under context parallelism)."""
        return self.work.seq_len // self.layout.cp

    @property
    def cp_ring_span(self) -> int:
        """Consecutive global ranks a CP ring spans (TP fastest, then CP): within a node when tp x cp fits."""
        return self.layout.tp * self.layout.cp

    @property
    def rounds(self) -> int:
        """Rounds of the interleaved schedule (torch's ScheduleInterleaved1F1B): micro-batches in groups of pp."""
        return max(1, self.n_microbatches // self.layout.pp)

    @property
    def microbatches_per_round(self) -> int:
        return self.n_microbatches // self.rounds

    @property
    def fsdp(self) -> bool:
        """Whether FSDP2 wraps the stages: in every multi-rank run, also over a DP mesh of one rank
        (megaolmo.model.parallelize shards whenever a device mesh exists); one process casts as FSDP would."""
        return self.layout.world_size > 1

    @property
    def padded_vocab(self) -> int:
        return self.model.padded_vocab_size

    def block_param_shapes(self) -> list[tuple[int, int]]:
        """This TP rank's weights of one block: att_proj, attn_out, ff_proj, ff_out, and on OLMo-2/3 the norm
        weights as (n, 1): attn_norm and ff_norm (replicated over TP), q_norm and k_norm (split by head).

        The norms are 0.01% of the parameters, but FSDP2 shards (and pads) each of them on its own, so the
        dry run's exact count needs them."""
        m, tp = self.model, self.layout.tp
        hd = m.head_dim
        shapes = [
            ((m.n_heads + 2 * m.kv_heads) * hd // tp, m.d_model),
            (m.d_model, m.n_heads * hd // tp),
            (2 * m.ffn_hidden_size // tp, m.d_model),
            (m.d_model, m.ffn_hidden_size // tp),
        ]
        if m.norm_after:
            shapes += [(m.d_model, 1), (m.d_model, 1)]
        if m.qk_norm:
            shapes += [(m.n_heads * hd // tp, 1), (m.kv_heads * hd // tp, 1)]
        return shapes

    @property
    def block_params(self) -> int:
        return sum(a * b for a, b in self.block_param_shapes())

    @property
    def block_linear_params(self) -> int:
        """The four linears' share of `block_params` (what FP8 casts; the norms stay in their dtype)."""
        return sum(a * b for a, b in self.block_param_shapes()[:4])

    @property
    def embedding_shape(self) -> tuple[int, int]:
        return (self.padded_vocab // self.layout.tp, self.model.d_model)

    def ranks(self) -> list[PipelineRank]:
        layout, tied = self.layout, self.model.weight_tying
        n_stages = layout.pp * layout.vp
        out = []
        for pp_rank in range(layout.pp):
            stage_ids = stages_of_rank(pp_rank, layout.pp, layout.vp)
            first, last = 0 in stage_ids, n_stages - 1 in stage_ids
            copies = int(first) + int(last and tied and not first)
            out.append(
                PipelineRank(
                    pp_rank=pp_rank,
                    chunk_layers=tuple(self.stage_layers[i] for i in stage_ids),
                    first=first,
                    last=last,
                    embedding_copies=copies,
                    head=last and not tied,
                )
            )
        return out

    def final_norm_params(self, rank: PipelineRank) -> int:
        """ln_f's weight on the last stage (OLMo-2/3; OLMo-1's LayerNorm has none), replicated over TP."""
        return self.model.d_model if rank.last and self.model.norm_after else 0

    def unsharded_params(self, rank: PipelineRank) -> int:
        """Parameters this rank holds before DP sharding (after TP)."""
        return rank.layers * self.block_params + self.root_params(rank)

    def sharded_params(self, rank: PipelineRank) -> int:
        """Parameters this rank keeps under FSDP2: each tensor split along dim 0, padded to a multiple of the
        shard degree (dp x cp: FSDP2 shards over DP and CP together)."""
        dp = self.layout.shard_degree
        if dp == 1:
            return self.unsharded_params(rank)
        block = sum(math.ceil(a / dp) * b for a, b in self.block_param_shapes())
        vocab_rows, d = self.embedding_shape
        root = (rank.embedding_copies + int(rank.head)) * math.ceil(vocab_rows / dp) * d
        return rank.layers * block + root + math.ceil(self.final_norm_params(rank) / dp)

    def root_params(self, rank: PipelineRank) -> int:
        """Parameters outside the blocks (embedding, head, ln_f's weight): FSDP's root unit of each stage module."""
        vocab_rows, d = self.embedding_shape
        return (rank.embedding_copies + int(rank.head)) * vocab_rows * d + self.final_norm_params(rank)

    def block_indices(self, rank: PipelineRank) -> list[int]:
        """The blocks this pipeline rank runs, over all its stage modules (for per-layer attention windows)."""
        ranges = stage_layer_ranges(self.stage_layers)
        return [i for stage in stages_of_rank(rank.pp_rank, self.layout.pp, self.layout.vp) for i in ranges[stage]]

    def microbatches_in_flight(self, rank: PipelineRank) -> tuple[int, int]:
        """(forward chunks whose activations are alive at once at the peak, chunks the rank runs per step).

        1F1B (torch's Schedule1F1B): rank r warms up with pp - r forwards. GPipe: all micro-batches.
        Interleaved (torch's ScheduleInterleaved1F1B): (vp - 1) x pp + 2 (pp - 1 - r) warm-up chunk forwards
        plus one, which for rank 0 is Megatron's pp x vp x (1 + (pp - 1) / (pp x vp)) chunks.
        """
        layout, m = self.layout, self.n_microbatches
        if layout.pp == 1:
            return 1, m
        if layout.pp_schedule == "gpipe":
            return m, m
        if layout.vp == 1:
            return min(m, layout.pp - rank.pp_rank), m
        warmup = (layout.vp - 1) * self.microbatches_per_round + 2 * (layout.pp - 1 - rank.pp_rank)
        return min(warmup + 1, m * layout.vp), m * layout.vp

    def gradients_alive_at_peak(self, rank: PipelineRank) -> bool:
        """Whether every local gradient already exists while the most activations are alive: only when the
        steady 1F1B phase runs a forward after each local stage module has run a backward."""
        layout = self.layout
        in_flight, chunks = self.microbatches_in_flight(rank)
        if layout.pp_schedule == "gpipe" and layout.pp > 1:
            return False
        steady = chunks - (in_flight - 1)
        return steady >= (layout.vp - 1) * self.microbatches_per_round + 2

    def bubble_fraction(self) -> float:
        """Idle fraction of the pipeline relative to the ideal time: (pp - 1) / (vp x m)."""
        return (self.layout.pp - 1) / (self.layout.vp * self.n_microbatches)
