"""OLMo laid out over tensor, pipeline and data parallelism, in the order torchtitan applies them.

From one model config and one parallel config: validate the layout, build the
model on the meta device, cut this rank's pipeline stages out of it, shard its
TP layers, mark activation checkpointing, materialize and initialize (the same
weights for every layout), then shard over DP with FSDP2. `forward_backward`
runs one global batch's share on this rank through the pipeline schedule (or
plain gradient accumulation without PP); the result equals one process.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from megaolmo.config import ConfigError, Fp8Config, ModelConfig, ParallelConfig
from megaolmo.fp8 import apply_fp8, check_backend, emulates
from megaolmo.model.init import init_parameters
from megaolmo.model.olmo import OLMo
from megaolmo.parallel import TensorParallel, tensor_parallel_layers
from megaolmo.parallel.cross_entropy import vocab_parallel_cross_entropy
from megaolmo.parallel.data_parallel import shard_data_parallel
from megaolmo.parallel.grad_norm import clip_grad_norm_
from megaolmo.parallel.mesh import ParallelMesh, resolve_dp
from megaolmo.parallel.pipeline import build_schedule, stage_layer_ranges, stages_of_rank


def validate_layout(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> ModelConfig:
    """Check the layout against the world size and the model before any group or tensor exists.

    Returns the model config with the embedding padded to a multiple of 128 x tp
    (when the embedding size is not given explicitly).
    """
    resolve_dp(parallel, world_size)
    tp = parallel.tp
    if model.n_heads % tp:
        raise ConfigError(f"model.n_heads={model.n_heads} is not divisible by parallel.tp={tp}")
    if model.kv_heads % tp:
        raise ConfigError(
            f"model.n_kv_heads={model.kv_heads} is not divisible by parallel.tp={tp}; each TP rank needs whole "
            "key/value heads (megaolmo does not replicate them): use a tp that divides n_kv_heads"
        )
    if model.ffn_hidden_size % tp:
        raise ConfigError(f"model.ffn_hidden_size={model.ffn_hidden_size} is not divisible by parallel.tp={tp}")
    if model.d_model % tp:
        raise ConfigError(f"model.d_model={model.d_model} is not divisible by parallel.tp={tp}")
    if parallel.vp > 1 and parallel.pp == 1:
        raise ConfigError(f"parallel.vp={parallel.vp} needs parallel.pp > 1")
    stage_layer_ranges(model.n_layers, parallel.pp * parallel.vp, parallel.pp_layer_split)
    if model.embedding_size is None:
        multiple = 128 * tp
        return dataclasses.replace(model, embedding_size=-(-model.vocab_size // multiple) * multiple)
    if model.embedding_size % tp:
        raise ConfigError(
            f"model.embedding_size={model.embedding_size} is not divisible by parallel.tp={tp}; "
            "set it to a multiple of tp, or to null to pad automatically"
        )
    return model


@dataclass
class StepLosses:
    """Mean cross entropy and z-loss per target token over the whole global batch (same on every rank)."""

    ce: float
    z: float
    tokens: int


def microbatches_in(parallel: ParallelConfig, rows: int, micro_batch_size: int, seq_len: int) -> int:
    """Micro-batches in a DP rank's `rows` sequences, after the checks every layout needs."""
    if rows % micro_batch_size:
        raise ConfigError(
            f"this rank's batch of {rows} sequences is not divisible by micro_batch_size={micro_batch_size}"
        )
    if parallel.sequence_parallel and seq_len % parallel.tp:
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
    parallel: ParallelConfig, dp: int, global_batch_size: int, micro_batch_size: int, seq_len: int
) -> int:
    """Micro-batches each DP rank runs per step: the start-up check of a run's batch against its layout."""
    if global_batch_size % (micro_batch_size * dp):
        raise ConfigError(
            f"trainer.global_batch_size={global_batch_size} is not divisible by "
            f"trainer.micro_batch_size={micro_batch_size} x dp={dp}"
        )
    return microbatches_in(parallel, global_batch_size // dp, micro_batch_size, seq_len)


class ParallelOLMo:
    """This rank's part of an OLMo under a TP x PP x DP layout, and the step that trains it."""

    def __init__(
        self,
        model: ModelConfig,
        parallel: ParallelConfig,
        seed: int = 0,
        param_dtype: torch.dtype = torch.float32,
        z_loss_multiplier: float = 0.0,
        ignore_index: int = -100,
        fp8: Fp8Config | None = None,
    ) -> None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.config = validate_layout(model, parallel, world_size)
        self.parallel = parallel
        self.mesh = ParallelMesh(parallel)
        self.fp8 = fp8 or Fp8Config()
        check_backend(self.config.linear, self.mesh.device, self.fp8)
        # torchao's FP8 with high-precision matmuls (no FP8 GEMM here, or fp8.emulate=true)
        self.fp8_emulated = emulates(self.config.linear, self.fp8, self.mesh.device)
        self.amax_group = self.mesh.build_amax_group() if self.config.linear == "te" else None
        self.high_precision_layers: list[str] = []  # block linears kept out of FP8 (dims not multiples of 16)
        self.param_dtype = param_dtype
        self.z_loss_multiplier = z_loss_multiplier
        self.ignore_index = ignore_index
        self.n_stages = parallel.pp * parallel.vp
        ranges = stage_layer_ranges(self.config.n_layers, self.n_stages, parallel.pp_layer_split)
        self.stage_ids = stages_of_rank(self.mesh.pp_rank, parallel.pp, parallel.vp)
        with torch.device("meta"):
            whole = OLMo(self.config)
        self.stages: list[OLMo] = []
        for stage_id in self.stage_ids:
            stage = copy.deepcopy(whole) if len(self.stage_ids) > 1 else whole
            stage.keep_stage(ranges[stage_id], first=stage_id == 0, last=stage_id == self.n_stages - 1)
            self._build_stage(stage, seed)
            self.stages.append(stage)
        self.tied_replica = self._tied_replica()
        if self.config.weight_tying:
            self.mesh.build_embedding_group()
        self._schedules: dict[tuple[int, int, int], object] = {}
        self._normalizer = 1.0
        self._loss_sums: list[torch.Tensor] = []  # [ce, z] sums of each micro-batch
        self._row_sums: list[torch.Tensor] = []  # cross entropy of each row

    def _build_stage(self, stage: OLMo, seed: int) -> None:
        if self.mesh.tp_group is not None and self.mesh.tp > 1:
            tp = TensorParallel(self.mesh.tp_group, self.parallel.sequence_parallel)
            for layer in set(tensor_parallel_layers(stage).values()):
                layer.shard(tp)
        for block in stage.blocks.values():
            block.activation_checkpointing = self.parallel.activation_checkpointing
        stage.to_empty(device=self.mesh.device)
        init_parameters(stage, self.config, seed)
        self.high_precision_layers += apply_fp8(
            stage, self.config.linear, self.fp8, self.config.n_layers, self.amax_group, self.fp8_emulated
        )
        if self.mesh.dp_mesh is not None:
            shard_data_parallel(
                stage,
                list(stage.blocks.values()),
                self.mesh.dp_mesh,
                self.param_dtype,
                reshard_after_forward=self.parallel.reshard_after_forward,
            )

    def _tied_replica(self) -> nn.Parameter | None:
        """The last stage's copy of a tied embedding, when the first stage is on another rank."""
        if not self.config.weight_tying or self.parallel.pp == 1 or self.n_stages - 1 not in self.stage_ids:
            return None
        return self.stages[self.stage_ids.index(self.n_stages - 1)].wte.weight

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter this rank updates (for the optimizer)."""
        return [p for stage in self.stages for p in stage.parameters()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [item for stage in self.stages for item in stage.named_parameters()]

    @property
    def output_layer(self) -> nn.Module:
        last = self.stages[-1]
        return last.head if last.head is not None else last.wte

    def _vocab_start(self) -> int:
        layer = self.output_layer
        return layer.vocab_start if hasattr(layer, "vocab_start") else self.mesh.tp_rank * layer.weight.shape[0]

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross entropy (+ z-loss) of one micro-batch over the target tokens of the whole batch."""
        z_loss = self.z_loss_multiplier > 0
        ce, log_z = vocab_parallel_cross_entropy(
            logits, labels, self._vocab_start(), self.mesh.tp_group, self.ignore_index, with_log_z=z_loss
        )
        ce_sum = ce.sum()
        z_sum = (log_z.pow(2) * (labels != self.ignore_index)).sum() * self.z_loss_multiplier if z_loss else 0 * ce_sum
        self._loss_sums.append(torch.stack([ce_sum.detach(), z_sum.detach()]))
        self._row_sums.append(ce.detach().sum(-1))
        return (ce_sum + z_sum) / self._normalizer

    def _schedule(self, micro_batch_size: int, seq_len: int, n_microbatches: int):
        key = (micro_batch_size, seq_len, n_microbatches)
        if key not in self._schedules:
            device, dtype = self.mesh.device, self.param_dtype
            local_seq = seq_len // self.mesh.tp if self.parallel.sequence_parallel else seq_len
            # requires_grad marks what carries gradients between stages (everything but the token ids).
            hidden = torch.empty(local_seq, micro_batch_size, self.config.d_model, device=device, dtype=dtype)
            hidden.requires_grad_()
            ids = torch.empty(micro_batch_size, seq_len, dtype=torch.long, device=device)
            vocab = self.config.padded_vocab_size // self.mesh.tp
            logits = torch.empty(micro_batch_size, seq_len, vocab, device=device, dtype=dtype, requires_grad=True)
            inputs = [ids if i == 0 else hidden for i in self.stage_ids]
            outputs = [logits if i == self.n_stages - 1 else hidden for i in self.stage_ids]
            self._schedules[key] = build_schedule(
                self.parallel.pp_schedule,
                self.stages,
                self.stage_ids,
                self.n_stages,
                device,
                self.mesh.pp_group,
                inputs,
                outputs,
                n_microbatches,
                self._loss,
            )
        return self._schedules[key]

    def check_batch(self, input_ids: torch.Tensor, micro_batch_size: int) -> int:
        """Number of micro-batches in this rank's share of the batch, after checking the shapes."""
        batch, seq_len = input_ids.shape
        return microbatches_in(self.parallel, batch, micro_batch_size, seq_len)

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int) -> StepLosses:
        """Forward and backward of this DP rank's share [B / dp, s] of the global batch; gradients accumulate."""
        n_microbatches = self.check_batch(input_ids, micro_batch_size)
        input_ids, labels = input_ids.to(self.mesh.device), labels.to(self.mesh.device)
        tokens = (labels != self.ignore_index).sum()
        if self.mesh.dp_group is not None:
            dist.all_reduce(tokens, group=self.mesh.dp_group)
        self._normalizer = max(int(tokens), 1)
        self._loss_sums, self._row_sums = [], []
        if self.parallel.pp == 1:
            self._accumulate(input_ids, labels, micro_batch_size)
        else:
            schedule = self._schedule(micro_batch_size, input_ids.shape[1], n_microbatches)
            first, last = 0 in self.stage_ids, self.n_stages - 1 in self.stage_ids
            args = (input_ids,) if first else ()
            # return_outputs=False: the losses are all the step needs; keeping every micro-batch's logits
            # for a return value would hold m x [b, s, V / tp] on the last stage.
            schedule.step(*args, target=labels if last else None, return_outputs=False)
            self._sum_tied_gradients()
        return self._reduce_losses()

    @torch.no_grad()
    def row_losses(self, input_ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
        """Summed cross entropy of each row of this DP rank's share [B / dp, s] (CPU, on every rank of the
        share's TP x PP group). Forward only."""
        n_microbatches = self.check_batch(input_ids, micro_batch_size)
        input_ids, labels = input_ids.to(self.mesh.device), labels.to(self.mesh.device)
        self._normalizer = 1.0
        self._loss_sums, self._row_sums = [], []
        if self.parallel.pp == 1:
            (stage,) = self.stages
            for ids, target in zip(input_ids.split(micro_batch_size), labels.split(micro_batch_size)):
                with self._autocast():
                    self._loss(stage(ids), target)
        else:
            schedule = self._schedule(micro_batch_size, input_ids.shape[1], n_microbatches)
            first, last = 0 in self.stage_ids, self.n_stages - 1 in self.stage_ids
            schedule.eval(*((input_ids,) if first else ()), target=labels if last else None)
        rows = torch.cat(self._row_sums) if self._row_sums else torch.zeros(len(input_ids), device=self.mesh.device)
        if self.mesh.pp_group is not None:
            dist.all_reduce(rows, group=self.mesh.pp_group)  # only the last stage computed them
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

    def _autocast(self):
        """Mixed precision for a single process (FSDP's policy does it when sharded)."""
        enabled = self.mesh.dp_mesh is None and self.param_dtype != torch.float32
        return torch.autocast(self.mesh.device.type, dtype=self.param_dtype, enabled=enabled)

    def _accumulate(self, input_ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int) -> None:
        (stage,) = self.stages
        chunks = list(zip(input_ids.split(micro_batch_size), labels.split(micro_batch_size)))
        for i, (ids, target) in enumerate(chunks):
            if self.mesh.dp_mesh is not None:
                stage.set_requires_gradient_sync(i == len(chunks) - 1)  # reduce-scatter once, after the last
            with self._autocast():
                loss = self._loss(stage(ids), target)
            loss.backward()

    def _sum_tied_gradients(self) -> None:
        """A tied embedding lives on the first and last stage: both copies take the sum of their gradients."""
        if not self.config.weight_tying or self.mesh.embedding_group is None:
            return
        owner = self.tied_replica if self.tied_replica is not None else self.stages[0].wte.weight
        grad = owner.grad.to_local() if isinstance(owner.grad, DTensor) else owner.grad
        dist.all_reduce(grad, group=self.mesh.embedding_group)

    def _reduce_losses(self) -> StepLosses:
        sums = torch.stack(self._loss_sums).sum(0) if self._loss_sums else torch.zeros(2, device=self.mesh.device)
        for group in (self.mesh.pp_group, self.mesh.dp_group):
            if group is not None:
                dist.all_reduce(sums, group=group)
        ce, z = (sums / self._normalizer).tolist()
        return StepLosses(ce=ce, z=z, tokens=self._normalizer)

    def clip_grad_norm_(self, max_norm: float | None) -> float:
        """Clip by the global gradient norm over TP, PP and DP (each parameter counted once)."""
        counted = [p for p in self.parameters() if p is not self.tied_replica]
        replicas = [self.tied_replica] if self.tied_replica is not None else []
        return clip_grad_norm_(counted, max_norm, replicas).item()

    def consolidated_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's unsharded state_dict on global rank 0 (None elsewhere). Collective."""
        state = self.full_tensors()
        if not dist.is_initialized():
            return state
        representative = self.mesh.tp_rank == 0 and self.mesh.dp_rank == 0
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(state if representative else {}, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        return {name: tensor for part in gathered for name, tensor in part.items()}

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
                out[name] = owners[name].gather_full(tensor.detach()).to("cpu", copy=True)
        return out
