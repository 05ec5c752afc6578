"""The training loop: OLMo on any TP x PP x DP layout, from a resolved config to the final weights.

The data of step b are the global indices [b*B, (b+1)*B) of a (seed, epoch)
order, split among the data-parallel ranks, and the weights start from (seed,
parameter name): the same seed gives the same run on every layout. The loop
delegates: the step to the engine (megaolmo.model.ParallelOLMo), saving and
resuming to the Checkpointer, evaluation to megaolmo.eval, and what rank 0
writes and shows to the RunLog.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from megaolmo.config import Config, ResolvedRun
from megaolmo.data import Batch, DataSources, GlobalBatches, MemmapDataset, RepetitionFilter
from megaolmo.data.mixture import MixtureDataset, TokensSeen
from megaolmo.data.tokenizer import eos_id, load_tokenizer
from megaolmo.errors import ConfigError
from megaolmo.eval.in_loop import InLoopDownstream, InLoopEvaluator
from megaolmo.model.engine import ParallelOLMo, StepLosses
from megaolmo.model.flops import flops_per_token, peak_flops_per_device, peak_memory_gib
from megaolmo.model.fp8 import apply_tf32, precompute_fp8_scales
from megaolmo.parallel.launch import init_distributed, is_rank_zero
from megaolmo.parallel.mesh import device_type
from megaolmo.train.checkpointer import Checkpointer
from megaolmo.train.optim import build_optimizer, learning_rate, max_grad_norm
from megaolmo.train.preemption import PREEMPTED_EXIT_CODE, StopRequest
from megaolmo.train.run_log import RunLog


def build_evaluator(config: Config, data: DataSources) -> InLoopEvaluator:
    """Held-out sources and, with trainer.downstream_tasks, the downstream tasks, read once."""
    trainer, downstream = config.trainer, None
    if trainer.downstream_tasks:
        if data.tokenizer is None:
            raise ConfigError("trainer.downstream_tasks needs data.tokenizer (the tokenizer the data was made with)")
        downstream = InLoopDownstream(trainer.downstream_tasks, data.tokenizer, trainer.downstream_limit)
    instances = trainer.eval_batches * trainer.global_batch_size
    return InLoopEvaluator(data.valid, instances=instances, downstream=downstream)


def training_batches(config: Config, data: DataSources, run_dir: Path) -> GlobalBatches:
    """The run's global batches with OLMo's data controls, checked before training: the label masks of
    data.label_mask_paths beside the token files of data.paths, and the instance filter data.instance_filter."""
    train, masks = data.train, config.data.label_mask_paths
    if masks:
        if not config.data.paths:
            raise ConfigError(
                f"data.label_mask_paths={list(masks)} needs data.paths (a mask goes with each token file there); "
                "set data.paths to the token files the masks were made for"
            )
        train = MemmapDataset(train.paths, train.seq_len, config.data.dtype, label_mask_paths=masks)
    trainer, repetition = config.trainer, RepetitionFilter.from_config(config.data.instance_filter)
    return GlobalBatches(
        train, trainer.global_batch_size, trainer.seed, order_dir=run_dir / "data_order", instance_filter=repetition
    )


def filtered_instances(batch: Batch, model: ParallelOLMo) -> int:
    """Instances of the global batch that the instance filter dropped: this DP rank's rows, summed over DP."""
    count = (~batch.instance_mask).sum().to(model.mesh.device)  # collectives take the mesh's device (NCCL)
    if model.mesh.dp_group is not None:
        dist.all_reduce(count, group=model.mesh.dp_group)
    return int(count)


def train_step(
    model: ParallelOLMo, optimizer: torch.optim.Optimizer, batch: Batch, *, config: Config, step: int
) -> tuple[StepLosses, float, bool]:
    """One optimizer step on this rank's rows of the global batch: (losses, gradient norm, whether applied).
    The loss is the mean over the global batch's targets (its label and instance masks applied).
    A step whose loss or gradient norm is not finite is skipped (trainer.nonfinite=skip) or ends the run."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config.optim, step, config.trainer.max_steps)
    optimizer.zero_grad(set_to_none=True)
    losses = model.forward_backward(batch.input_ids, batch.labels(), config.trainer.micro_batch_size)
    grad_norm = model.clip_grad_norm_(max_grad_norm(config.optim, step))
    finite = math.isfinite(losses.ce) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
        precompute_fp8_scales(model.stages, config.fp8)  # fp8.all_gather: the next all-gathers' weight scales
    elif config.trainer.nonfinite == "stop":
        raise FloatingPointError(
            f"step {step}: loss {losses.ce} / gradient norm {grad_norm} is not finite; "
            "trainer.nonfinite=skip skips such steps instead"
        )
    if model.mesh.device.type == "cuda":
        torch.cuda.synchronize()
    return losses, grad_norm, finite


def prepare_data_order(batches: GlobalBatches, step: int) -> None:
    """Rank 0 builds the order of `step`'s epoch before any rank reads it: once per job, not once per rank."""
    if is_rank_zero():
        batches.prepare_order(batches.epoch_of(step))
    if dist.is_initialized():
        dist.barrier()


def check_document_boundaries(config: Config, data: DataSources) -> None:
    """Document masking splits instances at model.eos_token_id: it must be the EOS the data was prepared with."""
    if not config.data.document_masking or data.tokenizer is None:
        return
    data_eos = eos_id(load_tokenizer(data.tokenizer))
    if data_eos != config.model.eos_token_id:
        raise ConfigError(
            f"data.document_masking=true splits documents at model.eos_token_id={config.model.eos_token_id}, but "
            f"the data's tokenizer ends documents with {data_eos}; set model.eos_token_id={data_eos}"
        )


def train(config: Config, run: ResolvedRun, stop_request: StopRequest) -> bool:
    """Train to `trainer.stop_at` or `max_steps`; True when a stop signal ended the run early, after a checkpoint."""
    trainer, run_dir = config.trainer, Path(config.trainer.run_dir)
    data = DataSources(config.data, seq_len=run.seq_len, vocab_size=run.model.vocab_size, progress=is_rank_zero(),
                       instances=trainer.max_steps * trainer.global_batch_size, seed=trainer.seed)  # fmt: skip
    check_document_boundaries(config, data)
    evaluator = build_evaluator(config, data)
    batches = training_batches(config, data, run_dir)
    tokens_seen = TokensSeen(batches) if isinstance(batches.dataset, MixtureDataset) and is_rank_zero() else None
    init_distributed(device_type(config.parallel))
    apply_tf32(trainer.tf32, device_type(config.parallel))
    param_dtype = torch.bfloat16 if trainer.precision == "bf16" else torch.float32
    model = ParallelOLMo(run.model, config.parallel, seed=trainer.seed, param_dtype=param_dtype,
                         z_loss_multiplier=trainer.z_loss, fp8=config.fp8,
                         document_masking=config.data.document_masking,
                         loss_chunk_tokens=trainer.loss_chunk_tokens)  # fmt: skip
    if model.high_precision_layers and is_rank_zero():
        print(f"FP8: kept in high precision (dims not multiples of 16): {', '.join(model.high_precision_layers)}")
    if model.fp8_emulated and is_rank_zero():
        print("FP8: emulated (no FP8 GEMM on this device, or fp8.emulate=true): float8 casts and scaling, "
              "high-precision matmuls; its speed is not FP8's")  # fmt: skip
    device, tokens_per_step = model.mesh.device, trainer.global_batch_size * run.seq_len
    optimizer = build_optimizer(model.named_parameters(), config.optim, device)
    checkpointer = Checkpointer(run_dir, trainer)
    start_step = checkpointer.resume(model, optimizer, batches)
    stop = trainer.stop_at or trainer.max_steps
    log = RunLog(run_dir, enabled=is_rank_zero(), start_step=start_step, stop=stop, log_interval=trainer.log_interval,
                 tensorboard=trainer.tensorboard, wandb_project=trainer.wandb_project, progress=trainer.progress,
                 config=OmegaConf.to_container(OmegaConf.structured(config)))  # fmt: skip
    peak = peak_flops_per_device(config.cluster, device, param_dtype) * model.mesh.world_size
    step_flops = flops_per_token(run.model, run.seq_len) * tokens_per_step
    skipped = 0
    for step in range(start_step, stop):
        if step == start_step or step % batches.batches_per_epoch == 0:
            prepare_data_order(batches, step)
        start = time.perf_counter()
        batch = batches.batch(step, model.mesh.dp_rank, run.dp)  # this rank's rows of global batch `step`
        losses, grad_norm, applied = train_step(model, optimizer, batch, config=config, step=step)
        elapsed, skipped = time.perf_counter() - start, skipped + (not applied)
        values = {"loss": losses.ce, "z_loss": losses.z, "lr": optimizer.param_groups[0]["lr"],
                  "grad_norm": grad_norm, "tokens": (step + 1) * tokens_per_step,
                  "tokens_per_second": tokens_per_step / elapsed, "mfu": step_flops / elapsed / peak,
                  "skipped_steps": skipped}  # fmt: skip
        if batch.instance_mask is not None:
            values["filtered_instances"] = filtered_instances(batch, model)
        if tokens_seen is not None:  # tokens of each source so far, from the data order: exact after a resume
            values.update({f"tokens/{name}": tokens for name, tokens in tokens_seen(step + 1).items()})
        if trainer.eval_interval and ((step + 1) % trainer.eval_interval == 0 or step + 1 == stop):
            values.update(evaluator(model, trainer.micro_batch_size))
        log.log(step + 1, values)
        saved = checkpointer.due(step + 1)
        if saved:
            checkpointer.save(step + 1, model, optimizer, batches, required=step + 1 == stop)
        if stop_request.agreed(device) and step + 1 < stop:
            if not saved:
                checkpointer.save(step + 1, model, optimizer, batches, required=True)
            log.close(f"stop signal ({stop_request.signal_name or 'on another rank'}) after step {step + 1}: saved "
                      f"{checkpointer.path(step + 1)}; exit {PREEMPTED_EXIT_CODE} to requeue", error=True)  # fmt: skip
            return True
    if stop == trainer.max_steps:
        checkpointer.save_final(model, stop)
    if stop == start_step:
        log.close()
        return False
    outputs = "final/" if stop == trainer.max_steps else f"checkpoints/{checkpointer.path(stop).name}"
    log.close(f"trained to step {stop} ({stop * tokens_per_step:,} tokens), final loss {losses.ce:.4f}, "
              f"peak memory {peak_memory_gib(device):.2f} GiB; wrote {run_dir}/metrics.jsonl, loss.png, {outputs}",
              final_values={"peak_memory_gib": peak_memory_gib(device)})  # fmt: skip
    return False
