"""OLMo laid out over tensor, context, pipeline and data parallelism, in the order torchtitan applies them.

From a resolved layout (megaolmo.config.resolve_layout): build the model on the
meta device, cut this rank's pipeline stages out of it, then for each stage
shard its TP layers, join the CP ring, mark activation checkpointing, materialize and initialize
(the same weights for every layout, from (seed, parameter name)), swap in the
FP8 local GEMMs, compile each block (`model.compile`), and shard over DP with
FSDP2. What runs a step on the result is the engine (engine.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from megaolmo.config import ConfigError, Fp8Config, ResolvedLayout
from megaolmo.model.fp8 import apply_fp8
from megaolmo.model.init import init_parameters
from megaolmo.model.olmo import OLMo, RMSNorm
from megaolmo.parallel import TensorParallel, tensor_parallel_layers
from megaolmo.parallel.context import ContextParallel
from megaolmo.parallel.data_parallel import shard_data_parallel
from megaolmo.parallel.mesh import ParallelMesh
from megaolmo.parallel.pipeline import stage_layer_ranges, stages_of_rank


@dataclass
class Stages:
    """This rank's pipeline stage modules (one per virtual stage), parallelized and initialized."""

    modules: list[OLMo]
    ids: list[int]  # global stage index of each module, of `count`
    count: int  # pipeline stages in the whole model: pp x vp
    high_precision_layers: list[str] = field(default_factory=list)  # block linears kept out of FP8

    @property
    def first(self) -> bool:
        """Whether this rank embeds the token ids (runs stage 0)."""
        return 0 in self.ids

    @property
    def last(self) -> bool:
        """Whether this rank computes the logits and the loss (runs the last stage)."""
        return self.count - 1 in self.ids

    def tied_replica(self, layout: ResolvedLayout) -> nn.Parameter | None:
        """The last stage's copy of a tied embedding, when the first stage is on another rank."""
        if not layout.model.weight_tying or layout.parallel.pp == 1 or not self.last:
            return None
        return self.modules[self.ids.index(self.count - 1)].wte.weight


def apply_tensor_parallel(stage: OLMo, mesh: ParallelMesh, sequence_parallel: bool) -> None:
    """Shard every TP layer of the stage over the mesh's TP group (column, row and vocab parallel, QK-norm);
    under SP, the norms replicated over TP sum their weights' gradients over it."""
    if mesh.tp_group is None or mesh.tp == 1:
        return
    tp = TensorParallel(mesh.tp_group, sequence_parallel)
    for layer in set(tensor_parallel_layers(stage).values()):
        layer.shard(tp)
    if sequence_parallel:
        for module in stage.modules():
            if isinstance(module, RMSNorm):
                module.sequence_parallel_group = mesh.tp_group


def apply_context_parallel(stage: OLMo, mesh: ParallelMesh, sequence_parallel: bool) -> None:
    """Under CP the stage holds this rank's tokens of each sequence and attends over the CP ring
    (megaolmo.parallel.context); its weights are those of every CP rank, sharded with DP by FSDP."""
    if mesh.cp == 1:
        return
    split = mesh.tp if sequence_parallel else 1
    stage.context_parallel = ContextParallel(mesh.cp_group, mesh.cp, mesh.cp_rank, sequence_split=split)


def apply_activation_checkpointing(stage: OLMo, mode: str) -> None:
    """none | full (each block recomputed in backward) | selective (the attention core only)."""
    for block in stage.blocks.values():
        block.activation_checkpointing = mode


def apply_compile(stage: OLMo, *, fullgraph: bool, backend: str = "inductor") -> None:
    """torch.compile each block's forward (torchtitan's per-block compile): the blocks repeat one structure,
    so they share the compiled graphs of one code object instead of each tracing the whole stage.

    The block's `forward` is replaced, not its `__call__` (`nn.Module.compile`): FSDP2's hooks on the block
    then run eagerly around the compiled graph instead of breaking it, and the parameter names stay those of
    the plain model (no `_orig_mod.`), which checkpoints and TP layers key on. Shapes are static at first and
    become dynamic on the first other shape (torch's automatic dynamic): the training step's shape compiles
    once, and an evaluation (another grad mode, often another batch) once more, not once per batch.
    `backend="aot_eager"` (torch's debugging backend) traces the same forward and backward graphs and runs
    them without generating code: where a difference from eager comes from inductor's kernels or from tracing.
    """
    for block in stage.blocks.values():
        block.forward = torch.compile(block.forward, fullgraph=fullgraph, backend=backend)


def apply_async_tp(mesh: ParallelMesh) -> None:
    """torch's async TP (torchtitan's `maybe_enable_async_tp`): inductor's micro-pipeline pass splits each
    all-gather -> GEMM and GEMM -> reduce-scatter of the sequence-parallel regions into chunks exchanged over
    symmetric memory, so one chunk's communication runs under another's GEMM. The pass matches the functional
    collectives dynamo traces megaolmo's SP mappings into (it remaps their c10d calls): in a compiled block's
    forward, each all-gather feeds its column-parallel GEMM and each reduce-scatter takes its row-parallel one's
    output directly (inspected on CPU, where the pass itself does not run: it needs NCCL)."""
    if mesh.device.type != "cuda":
        raise ConfigError(
            f"parallel.async_tp=true needs CUDA (symmetric memory), not {mesh.device.type}; set it to false"
        )
    from torch._inductor import config as inductor_config
    from torch.distributed import _symmetric_memory

    inductor_config._micro_pipeline_tp = True
    enable = _symmetric_memory.enable_symm_mem_for_group
    if not hasattr(enable, "__deprecated__"):  # torch 2.13 enables it for every group itself
        enable(mesh.tp_group.group_name)


def apply_data_parallel(stage: OLMo, mesh: ParallelMesh, *, param_dtype: torch.dtype, reshard: bool) -> None:
    """FSDP2 over the DP (x CP) sub-mesh: each block a unit, the embedding and head the root's."""
    if mesh.shard_mesh is None:
        return
    shard_data_parallel(
        stage,
        list(stage.blocks.values()),
        mesh.shard_mesh,
        param_dtype=param_dtype,
        reshard_after_forward=reshard,
    )


def parallelize_olmo(
    layout: ResolvedLayout,
    mesh: ParallelMesh,
    *,
    seed: int,
    param_dtype: torch.dtype,
    fp8: Fp8Config,
    fp8_emulated: bool = False,
    amax_group=None,
    materialize: bool = True,
) -> Stages:
    """This rank's stages of the OLMo of `layout`: TP, CP, activation checkpointing, init, FP8, compile, FSDP.

    `materialize=False` leaves them on the meta device, uninitialized and without FP8 (which keeps the
    weights' shapes): the stages a dry run measures, at any world size, without allocating them.
    """
    config, parallel = layout.model, layout.parallel
    count = parallel.pp * parallel.vp
    ranges = stage_layer_ranges(layout.stage_layers)
    stages = Stages(modules=[], ids=stages_of_rank(mesh.pp_rank, parallel.pp, parallel.vp), count=count)
    if parallel.async_tp and materialize:
        apply_async_tp(mesh)
    with torch.device("meta"):
        whole = OLMo(config)
    for stage_id in stages.ids:
        stage = copy.deepcopy(whole) if len(stages.ids) > 1 else whole
        stage.keep_stage(ranges[stage_id], first=stage_id == 0, last=stage_id == count - 1)
        apply_tensor_parallel(stage, mesh, parallel.sequence_parallel)
        apply_context_parallel(stage, mesh, parallel.sequence_parallel)
        apply_activation_checkpointing(stage, parallel.activation_checkpointing)
        if materialize:
            stage.to_empty(device=mesh.device)
            init_parameters(stage, config, seed)
            stages.high_precision_layers += apply_fp8(
                stage,
                linear=config.linear,
                config=fp8,
                n_layers=config.n_layers,
                amax_group=amax_group,
                emulate=fp8_emulated,
            )
            if config.compile:  # flash-attn's varlen kernel reads document boundaries off the device: a break
                apply_compile(stage, fullgraph=config.attention == "sdpa")
        apply_data_parallel(stage, mesh, param_dtype=param_dtype, reshard=parallel.reshard_after_forward)
        stages.modules.append(stage)
    return stages
