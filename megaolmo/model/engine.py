"""The training-step engine: this rank's part of an OLMo under a TP x CP x PP x DP layout, and the step on it.

`ParallelOLMo` resolves the layout, builds the mesh and the stages
(parallelize.py), and runs one global batch's share on this rank: through the
pipeline schedule with PP, as plain gradient accumulation without. The loss is
normalized by the target tokens of the whole global batch, so gradients, losses
and evaluation equal one process's on every layout.

With `document_masking`, attention stays within the EOS-separated documents of each row. The engine reads
the documents off the token ids each rank holds (every rank of a pipeline holds its DP rows of the batch,
ids included) and hands each stage the document positions of the micro-batch it runs as a stage keyword
argument: the pipeline sends nothing more between stages, and callers pass nothing new.

Under context parallelism every CP rank of a DP rank is handed the same rows (token ids are a few bytes per
token) and keeps its load-balanced chunks of them (megaolmo.parallel.context.zigzag_split): ids and targets
are cut here, after the documents were read off the whole rows, whose positions every stage receives whole.
Losses, target counts and row sums are summed over the CP group, so the normalization counts the whole
sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.func import functional_call

from megaolmo.config import Fp8Config, ModelConfig, ParallelConfig, microbatches_in, resolve_layout
from megaolmo.data.documents import document_lengths, document_positions
from megaolmo.data.labels import IGNORE_INDEX
from megaolmo.model.fp8 import begin_fp8_step, check_backend, emulates, preserved_scaling_states
from megaolmo.model.loss import TokenLosses
from megaolmo.model.parallelize import parallelize_olmo
from megaolmo.parallel import tensor_parallel_layers
from megaolmo.parallel.context import zigzag_split
from megaolmo.parallel.grad_norm import clip_grad_norm_
from megaolmo.parallel.mesh import ParallelMesh
from megaolmo.parallel.pipeline import Schedule, build_schedule


@dataclass
class StepLosses:
    """Mean cross entropy and z-loss per target token over the whole global batch (same on every rank)."""

    ce: float
    z: float
    tokens: int


class MicroBatchLosses:
    """The loss function of the last stage: called on each micro-batch's per-token losses (the last stage's
    output given labels: cross entropy and log-sum-exp, megaolmo.model.loss), it keeps what a step reports.

    The schedule calls it once per micro-batch; `begin` starts a step with the target tokens of the whole
    global batch as the normalizer, after which `sums` holds [cross entropy, z-loss] summed over each
    micro-batch and `rows` the summed cross entropy of each row.
    """

    def __init__(self, *, ignore_index: int, z_loss_multiplier: float) -> None:
        self.ignore_index, self.z_loss_multiplier = ignore_index, z_loss_multiplier
        self.begin(normalizer=1)

    def begin(self, normalizer: int) -> None:
        self.normalizer = normalizer
        self.sums: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []

    def __call__(self, token_losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with_z = self.z_loss_multiplier > 0
        ce, log_z = token_losses.unbind(-1)
        ce_sum = ce.sum()
        z_sum = (log_z.pow(2) * (labels != self.ignore_index)).sum() * self.z_loss_multiplier if with_z else 0 * ce_sum
        self.sums.append(torch.stack([ce_sum.detach(), z_sum.detach()]))
        self.rows.append(ce.detach().sum(-1))
        return (ce_sum + z_sum) / self.normalizer

    def total(self, device: torch.device) -> torch.Tensor:
        """[cross entropy, z-loss] summed over this rank's micro-batches (zeros off the last stage)."""
        return torch.stack(self.sums).sum(0) if self.sums else torch.zeros(2, device=device)

    def row_sums(self, n_rows: int, device: torch.device) -> torch.Tensor:
        """Summed cross entropy of each row (zeros off the last stage)."""
        return torch.cat(self.rows) if self.rows else torch.zeros(n_rows, device=device)


class ParallelOLMo:
    """This rank's part of an OLMo under a TP x PP x DP layout, and the step that trains it."""

    def __init__(
        self,
        model: ModelConfig,
        parallel: ParallelConfig,
        *,
        seed: int = 0,
        param_dtype: torch.dtype = torch.float32,
        z_loss_multiplier: float = 0.0,
        ignore_index: int = IGNORE_INDEX,
        fp8: Fp8Config | None = None,
        document_masking: bool = False,
        loss_chunk_tokens: int | None = None,
    ) -> None:
        """`loss_chunk_tokens`: the loss forms that many tokens' logits at a time (megaolmo.model.loss), or all
        of a micro-batch's at once (None)."""
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.layout = resolve_layout(model, parallel, world_size)
        self.config, self.parallel = self.layout.model, parallel
        self.mesh = ParallelMesh(parallel)
        fp8 = fp8 or Fp8Config()
        check_backend(self.config.linear, self.mesh.device, fp8, dp=self.layout.dp * self.mesh.cp)
        # torchao's FP8 with high-precision matmuls (no FP8 GEMM here, or fp8.emulate=true)
        self.fp8_emulated = emulates(self.config.linear, fp8, self.mesh.device)
        amax_group = self.mesh.build_amax_group() if self.config.linear == "te" else None
        self.param_dtype, self.ignore_index = param_dtype, ignore_index
        self.document_masking = document_masking  # attention within documents; EOS is model.eos_token_id
        self.local_stages = parallelize_olmo(
            self.layout,
            self.mesh,
            seed=seed,
            param_dtype=param_dtype,
            fp8=fp8,
            fp8_emulated=self.fp8_emulated,
            amax_group=amax_group,
        )
        self.stages = self.local_stages.modules  # this rank's stage modules, in pipeline order
        for stage in self.stages:
            stage.token_losses = TokenLosses(loss_chunk_tokens, z_loss_multiplier > 0, ignore_index)
        self.tied_replica = self.local_stages.tied_replica(self.layout)
        self._norm_counted, self._norm_scaled_only = self._gradient_norm_terms()
        if self.config.weight_tying:
            self.mesh.build_embedding_group()
        self.losses = MicroBatchLosses(ignore_index=ignore_index, z_loss_multiplier=z_loss_multiplier)
        self._schedules: dict[tuple[int, int, int], Schedule] = {}

    @property
    def high_precision_layers(self) -> list[str]:
        """Block linears kept out of FP8 because their dims are not multiples of 16."""
        return self.local_stages.high_precision_layers

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter this rank updates (for the optimizer)."""
        return [p for stage in self.stages for p in stage.parameters()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [item for stage in self.stages for item in stage.named_parameters()]

    def _schedule(self, micro_batch_size: int, seq_len: int, n_microbatches: int):
        """The pipeline schedule of micro-batches of `seq_len` tokens (this CP rank's, under CP)."""
        key = (micro_batch_size, seq_len, n_microbatches)
        if key not in self._schedules:
            device, dtype = self.mesh.device, self.param_dtype
            local_seq = seq_len // self.mesh.tp if self.parallel.sequence_parallel else seq_len
            # requires_grad marks what carries gradients between stages (everything but the token ids).
            hidden = torch.empty(local_seq, micro_batch_size, self.config.d_model, device=device, dtype=dtype)
            hidden.requires_grad_()
            ids = torch.empty(micro_batch_size, seq_len, dtype=torch.long, device=device)
            # The last stage returns each token's cross entropy and log-sum-exp (megaolmo.model.loss), in fp32.
            losses = torch.empty(micro_batch_size, seq_len, 2, device=device, requires_grad=True)
            last = self.local_stages.count - 1
            self._schedules[key] = build_schedule(
                self.parallel.pp_schedule,
                modules=self.stages,
                stage_ids=self.local_stages.ids,
                n_stages=self.local_stages.count,
                device=device,
                group=self.mesh.pp_group,
                example_inputs=[ids if i == 0 else hidden for i in self.local_stages.ids],
                example_outputs=[losses if i == last else hidden for i in self.local_stages.ids],
                n_microbatches=n_microbatches,
                loss_fn=self.losses,
            )
        return self._schedules[key]

    def _to_device(
        self, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The rows on the mesh's device, and what every stage's forward takes besides its input: the targets
        (`labels`, which the last stage scores in its forward) and, with document masking, each token's
        position in its document (`doc_positions`, [rows, s]).

        The positions are computed from the ids where the loader put them (the host), before they move, so
        finding the documents costs the device no synchronization. Under CP the ids and targets returned are
        this CP rank's tokens of the rows, and the positions those of the whole rows.
        """
        kwargs = {}
        if self.document_masking:
            lengths = document_lengths(input_ids, self.config.eos_token_id)
            positions = document_positions(lengths, input_ids.shape[1])
            kwargs["doc_positions"] = positions.to(self.mesh.device, non_blocking=True)
        if self.mesh.cp > 1:
            input_ids, labels = (zigzag_split(t, self.mesh.cp, self.mesh.cp_rank) for t in (input_ids, labels))
        labels = labels.to(self.mesh.device)
        kwargs["labels"] = labels
        return input_ids.to(self.mesh.device), labels, kwargs

    def _pipeline_args(
        self, input_ids: torch.Tensor, labels: torch.Tensor, kwargs: dict[str, torch.Tensor]
    ) -> tuple[tuple, dict]:
        """What this rank feeds the schedule: the token ids on the first stage, the targets on the last, and
        the stage keyword arguments of its rows on every stage (the schedule splits them by micro-batch)."""
        args = (input_ids,) if self.local_stages.first else ()
        return args, {"target": labels if self.local_stages.last else None, **kwargs}

    def _micro_batches(
        self, input_ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int, kwargs: dict[str, torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """(token ids, targets, stage keyword arguments) of each micro-batch, without PP."""
        splits = {name: value.split(micro_batch_size) for name, value in kwargs.items()}
        return [
            (ids, target, {name: parts[i] for name, parts in splits.items()})
            for i, (ids, target) in enumerate(zip(input_ids.split(micro_batch_size), labels.split(micro_batch_size)))
        ]

    def check_batch(self, input_ids: torch.Tensor, micro_batch_size: int) -> int:
        """Number of micro-batches in this rank's share of the batch, after checking the shapes."""
        batch, seq_len = input_ids.shape
        return microbatches_in(self.parallel, batch, micro_batch_size, seq_len)

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int) -> StepLosses:
        """Forward and backward of this DP rank's share [B / dp, s] of the global batch; gradients accumulate."""
        n_microbatches = self.check_batch(input_ids, micro_batch_size)
        input_ids, labels, kwargs = self._to_device(input_ids, labels)
        tokens = (labels != self.ignore_index).sum()
        for group in (self.mesh.dp_group, self.mesh.cp_group):
            if group is not None:
                dist.all_reduce(tokens, group=group)
        self.losses.begin(normalizer=max(int(tokens), 1))
        begin_fp8_step(self.stages)  # TE casts the weights to FP8 at the first micro-batch, then reuses them
        if self.parallel.pp == 1:
            self._accumulate(input_ids, labels, micro_batch_size, kwargs)
        else:
            schedule = self._schedule(micro_batch_size, input_ids.shape[1], n_microbatches)
            args, kwargs = self._pipeline_args(input_ids, labels, kwargs)
            schedule.step(*args, **kwargs)  # the losses are all the step needs: no logits are kept
            self._sum_tied_gradients()
        sums = self.losses.total(self.mesh.device)
        for group in (self.mesh.pp_group, self.mesh.cp_group, self.mesh.dp_group):
            if group is not None:
                dist.all_reduce(sums, group=group)
        ce, z = (sums / self.losses.normalizer).tolist()
        return StepLosses(ce=ce, z=z, tokens=self.losses.normalizer)

    @torch.no_grad()
    def row_losses(self, input_ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
        """Summed cross entropy of each row of this DP rank's share [B / dp, s] (CPU, on every rank of the
        share's TP x PP group). Forward only; every FSDP unit is sharded again afterwards (`reshard`)."""
        n_microbatches = self.check_batch(input_ids, micro_batch_size)
        input_ids, labels, kwargs = self._to_device(input_ids, labels)
        self.losses.begin(normalizer=1)
        with preserved_scaling_states(self.stages):  # evaluation must not move TE's delayed FP8 scales
            try:
                if self.parallel.pp == 1:
                    (stage,) = self.stages
                    for ids, target, chunk in self._micro_batches(input_ids, labels, micro_batch_size, kwargs):
                        self.losses(self._forward(stage, ids, chunk), target)
                else:
                    schedule = self._schedule(micro_batch_size, input_ids.shape[1], n_microbatches)
                    args, kwargs = self._pipeline_args(input_ids, labels, kwargs)
                    schedule.eval(*args, **kwargs)
            finally:
                self.reshard()
        rows = self.losses.row_sums(len(input_ids), self.mesh.device)
        for group in (self.mesh.pp_group, self.mesh.cp_group):  # the last stage's, of each CP rank's tokens
            if group is not None:
                dist.all_reduce(rows, group=group)
        return rows.cpu()

    def evaluate(self, input_ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int) -> tuple[float, int]:
        """Summed cross entropy and target-token count of this DP rank's share, summed over DP. Forward only."""
        sums = torch.stack(
            [self.row_losses(input_ids, labels, micro_batch_size).sum(), (labels != self.ignore_index).sum()]
        )
        sums = sums.to(self.mesh.device, torch.float64)
        if self.mesh.dp_group is not None:
            dist.all_reduce(sums, group=self.mesh.dp_group)
        return sums[0].item(), int(sums[1].item())

    def _forward(self, stage: nn.Module, ids: torch.Tensor, kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
        """A stage's forward under FSDP's mixed precision, on every layout: compute-dtype copies of the fp32
        parameters, so activations flow in that dtype and gradients reach the fp32 parameters in fp32.

        FSDP casts when it gathers; one process, which has no FSDP, casts here. (Autocast instead would keep
        an fp32 residual stream that no multi-rank layout has, and one GPU would not compute what many do.)
        """
        if self.mesh.shard_mesh is not None or self.param_dtype == torch.float32:
            return stage(ids, **kwargs)
        copies = {name: param.to(self.param_dtype) for name, param in stage.named_parameters()}
        return functional_call(stage, copies, (ids,), kwargs)

    def reshard(self) -> None:
        """Shard every FSDP unit again: free its gathered copy and put back the fp32 shards the optimizer holds.

        Under ZeRO-2 only a backward reshards a unit, so after a forward-only pass `named_parameters()` would
        yield the gathered compute-dtype copies, and a checkpoint written then would save them. (torch's
        pipeline schedules reshard at the end of `eval` as it happens; called after every forward-only pass,
        this makes it the engine's guarantee.) The next forward gathers again.
        """
        for stage in self.stages:
            for module in stage.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def _accumulate(
        self, input_ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int, kwargs: dict[str, torch.Tensor]
    ) -> None:
        """Gradient accumulation without PP: under FSDP, gradients reduce-scatter once, after the last
        micro-batch; ZeRO-2 also keeps its gathered weights from one micro-batch to the next, so each unit
        all-gathers once per step, not once per micro-batch. ZeRO-3 still reshards after each forward and
        backward (keeping the weights would give up the memory it is chosen for)."""
        (stage,) = self.stages
        chunks = self._micro_batches(input_ids, labels, micro_batch_size, kwargs)
        keep_gathered = not self.parallel.reshard_after_forward
        for i, (ids, target, chunk) in enumerate(chunks):
            if self.mesh.shard_mesh is not None:
                # Set on every micro-batch, so a step that failed half-way leaves the next one nothing to undo.
                last = i == len(chunks) - 1
                stage.set_requires_gradient_sync(last)
                if keep_gathered:
                    stage.set_reshard_after_backward(last)
            loss = self.losses(self._forward(stage, ids, chunk), target)
            loss.backward()

    def _sum_tied_gradients(self) -> None:
        """A tied embedding lives on the first and last stage: both copies take the sum of their gradients."""
        if not self.config.weight_tying or self.mesh.embedding_group is None:
            return
        owner = self.tied_replica if self.tied_replica is not None else self.stages[0].wte.weight
        grad = owner.grad.to_local() if isinstance(owner.grad, DTensor) else owner.grad
        dist.all_reduce(grad, group=self.mesh.embedding_group)

    def _gradient_norm_terms(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(parameters the gradient norm counts, parameters it only scales), fixed once the stages are built.

        Each parameter is counted once over the world: a tied head's copy of the embedding is scaled only, and
        a parameter replicated over TP (an OLMo-2 norm's weight) is counted on TP rank 0 and scaled on all.
        """
        counted, scaled_only = [], [self.tied_replica] if self.tied_replica is not None else []
        for stage in self.stages:
            split_by_tp = {
                id(param) for layer in tensor_parallel_layers(stage).values() for param in layer.parameters()
            }
            for param in stage.parameters():
                if param is self.tied_replica:
                    continue
                tp_copy = id(param) not in split_by_tp and self.mesh.tp_rank != 0
                (scaled_only if tp_copy else counted).append(param)
        return counted, scaled_only

    def clip_grad_norm_(self, max_norm: float | None) -> float:
        """Clip by the global gradient norm over TP, PP and DP (each parameter counted once)."""
        return clip_grad_norm_(self._norm_counted, max_norm, self._norm_scaled_only).item()

    @torch.no_grad()
    def full_tensors(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Unsharded (over TP and DP) parameters or gradients of this rank's stages, by name. Collective."""
        out = {}
        for stage in self.stages:
            owners = tensor_parallel_layers(stage)
            for name, param in stage.named_parameters():
                tensor = param.grad if grads else param
                if isinstance(tensor, DTensor):
                    tensor = tensor.full_tensor()
                layer = owners.get(name)  # None: replicated over TP
                full = tensor.detach() if layer is None else layer.gather_full(tensor.detach())
                out[name] = full.to("cpu", copy=True)
        return out
