"""`python -m megaolmo.train`: train OLMo on any TP x PP x DP layout, composed by Hydra from conf/.

With no arguments it trains olmo_tiny on the built-in corpus (the Python
standard library) on this machine. Launch more ranks with torchrun (or srun):

    torchrun --nproc-per-node 8 -m megaolmo.train parallel=tp2_pp2_dp2

The data of step b are the global indices [b*B, (b+1)*B) of a (seed, epoch)
order, split among the data-parallel ranks, and the weights start from (seed,
parameter name): the same seed gives the same run on every layout.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from megaolmo import sharded_checkpoint
from megaolmo.checkpoint import CheckpointError, save_consolidated
from megaolmo.config import CONF_DIR, Config, ConfigError
from megaolmo.data import DataError, GlobalBatches, MemmapDataset, builtin_corpus, check_compatible
from megaolmo.data.dataset import dp_rows
from megaolmo.distributed import init_distributed, is_rank_zero, launch_world_size, shutdown
from megaolmo.eval.errors import EvalError
from megaolmo.eval.in_loop import InLoopDownstream
from megaolmo.metrics import MetricsWriter, flops_per_token, peak_flops_per_device, peak_memory_gib, plot_losses
from megaolmo.model.parallelize import ParallelOLMo, microbatches_per_rank, validate_layout
from megaolmo.optim import build_optimizer, learning_rate, max_grad_norm
from megaolmo.parallel.mesh import device_type, resolve_dp
from megaolmo.preemption import PREEMPTED_EXIT_CODE, StopRequest
from megaolmo.sharded_checkpoint import checkpoint_name, find_resume_point, remove_incomplete
from megaolmo.sweep import register_point_resolver

ConfigStore.instance().store(name="megaolmo_schema", node=Config)
register_point_resolver()
IGNORE = -100


def shifted_labels(batch: torch.Tensor) -> torch.Tensor:
    """Next-token targets for every position; the last position has none."""
    return torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], IGNORE)], dim=1)


class DataSources:
    """Training memmaps and held-out memmaps per source, checked against the model's tokenizer and vocab."""

    def __init__(self, config: Config, seq_len: int) -> None:
        data = config.data
        if data.paths:
            train, valid, tokenizer = [Path(p) for p in data.paths], [Path(p) for p in data.valid_paths], None
            if data.tokenizer is not None:
                tokenizer = Path(data.tokenizer)
        else:
            corpus = builtin_corpus(
                Path(data.cache_dir) if data.cache_dir else None, data.builtin_vocab_size, progress=is_rank_zero()
            )
            train, valid, tokenizer = corpus.train_paths, corpus.valid_paths, corpus.tokenizer_path
        for paths in (train, valid):
            if paths:
                check_compatible(paths, tokenizer, config.model.vocab_size)
        self.tokenizer = tokenizer
        self.train = MemmapDataset(train, seq_len, data.dtype)
        self.valid = {path.stem: MemmapDataset([path], seq_len, data.dtype) for path in valid}


def layout_or_hint(config: Config) -> tuple:
    """Validate the layout against the launched ranks; on a mismatch say which torchrun line fits."""
    world = launch_world_size()
    try:
        model_config = validate_layout(config.model, config.parallel, world)
    except ConfigError as err:
        parallel = config.parallel
        if "world size" not in str(err):
            raise
        needed = parallel.tp * parallel.pp * (parallel.dp or 1)
        raise ConfigError(
            f"{err}; e.g. torchrun --nproc-per-node {needed} -m megaolmo.train {' '.join(sys.argv[1:])}".rstrip()
        ) from None
    return model_config, resolve_dp(config.parallel, world)


def evaluate(model: ParallelOLMo, sources: dict[str, MemmapDataset], config: Config) -> dict[str, float]:
    """Loss, perplexity and bits per byte per held-out source, on the same instances for every layout:
    the first eval_batches x global_batch_size of each source, in chunks that pad the last one."""
    trainer, dp = config.trainer, model.mesh.dp
    per_rank = trainer.micro_batch_size * max(config.parallel.pp, 1)
    metrics = {}
    for source, dataset in sources.items():
        count = min(len(dataset), trainer.eval_batches * trainer.global_batch_size)
        if count == 0:
            continue
        nll, tokens = 0.0, 0
        for start in range(0, count, per_rank * dp):
            batch = dataset.get_batch(range(start, min(start + per_rank * dp, count)))
            labels = shifted_labels(batch)
            padding = per_rank * dp - len(batch)
            if padding:
                batch = torch.cat([batch, torch.zeros(padding, batch.shape[1], dtype=batch.dtype)])
                labels = torch.cat([labels, torch.full((padding, labels.shape[1]), IGNORE, dtype=labels.dtype)])
            rows = dp_rows(len(batch), model.mesh.dp_rank, dp)
            chunk_nll, chunk_tokens = model.evaluate(batch[rows], labels[rows], trainer.micro_batch_size)
            nll, tokens = nll + chunk_nll, tokens + chunk_tokens
        loss = nll / tokens
        metrics[f"eval/{source}/loss"] = loss
        metrics[f"eval/{source}/perplexity"] = math.exp(min(loss, 50.0))
        if dataset.bytes_per_token:
            metrics[f"eval/{source}/bits_per_byte"] = loss / math.log(2) / dataset.bytes_per_token
    return metrics


def train(config: Config, stop_request: StopRequest) -> bool:
    """Train to `trainer.stop_at` or `max_steps`; True when a stop signal ended the run early, after a checkpoint."""
    run_dir = Path(config.trainer.run_dir)
    model_config, dp = layout_or_hint(config)
    trainer = config.trainer
    seq_len = config.seq_len()
    microbatches_per_rank(config.parallel, dp, trainer.global_batch_size, trainer.micro_batch_size, seq_len)
    data = DataSources(config, seq_len)
    downstream = None
    if trainer.downstream_tasks:
        if data.tokenizer is None:
            raise ConfigError("trainer.downstream_tasks needs data.tokenizer (the tokenizer the data was made with)")
        downstream = InLoopDownstream(trainer.downstream_tasks, data.tokenizer, trainer.downstream_limit)
    batches = GlobalBatches(data.train, trainer.global_batch_size, trainer.seed)
    init_distributed(device_type(config.parallel))
    param_dtype = torch.bfloat16 if trainer.precision == "bf16" else torch.float32
    model = ParallelOLMo(model_config, config.parallel, trainer.seed, param_dtype, trainer.z_loss, IGNORE, config.fp8)
    if model.high_precision_layers and is_rank_zero():
        print(f"FP8: kept in high precision (dims not multiples of 16): {', '.join(model.high_precision_layers)}")
    if model.fp8_emulated and is_rank_zero():
        print("FP8: emulated (no FP8 GEMM on this device, or fp8.emulate=true): float8 casts and scaling, "
              "high-precision matmuls; its speed is not FP8's")  # fmt: skip
    device = model.mesh.device
    optimizer = build_optimizer(model.named_parameters(), config.optim, device)
    start_step = resume(config, run_dir, model, optimizer, batches)
    stop = trainer.stop_at or trainer.max_steps
    rank_zero = is_rank_zero()
    writer, progress = None, None
    if rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        keep_metrics_until(run_dir / "metrics.jsonl", start_step)
        writer = MetricsWriter(run_dir, trainer.tensorboard, trainer.wandb_project, OmegaConf.to_container(
            OmegaConf.structured(config)))  # fmt: skip
        if trainer.progress:
            from tqdm import tqdm

            progress = tqdm(total=stop, initial=start_step, desc="train", dynamic_ncols=True)
    world = model.mesh.world_size
    peak = peak_flops_per_device(config.cluster, device, param_dtype) * world
    step_flops = flops_per_token(model_config, seq_len) * trainer.global_batch_size * seq_len
    skipped, tokens_seen = 0, start_step * trainer.global_batch_size * seq_len
    for step in range(start_step, stop):
        start = time.perf_counter()
        batch = batches.batch(step, model.mesh.dp_rank, dp)  # this rank's rows of global batch `step`
        lr = learning_rate(config.optim, step, trainer.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        losses = model.forward_backward(batch, shifted_labels(batch), trainer.micro_batch_size)
        grad_norm = model.clip_grad_norm_(max_grad_norm(config.optim, step))
        if math.isfinite(losses.ce) and math.isfinite(grad_norm):
            optimizer.step()
        elif trainer.nonfinite == "stop":
            raise FloatingPointError(
                f"step {step}: loss {losses.ce} / gradient norm {grad_norm} is not finite; "
                "trainer.nonfinite=skip skips such steps instead"
            )
        else:
            skipped += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens_seen += trainer.global_batch_size * seq_len
        values = {
            "loss": losses.ce,
            "z_loss": losses.z,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens_seen,
            "tokens_per_second": trainer.global_batch_size * seq_len / elapsed,
            "mfu": step_flops / elapsed / peak,
            "skipped_steps": skipped,
        }
        last = step == stop - 1
        if trainer.eval_interval and ((step + 1) % trainer.eval_interval == 0 or last):
            values.update(evaluate(model, data.valid, config))
            if downstream is not None:
                values.update(downstream(model, trainer.micro_batch_size))
        if rank_zero:
            if (step + 1) % trainer.log_interval == 0 or last or any(k.startswith("eval/") for k in values):
                writer.write(step + 1, values)
            if progress is not None:
                progress.set_postfix(
                    loss=f"{losses.ce:.3f}", lr=f"{lr:.2e}", tok_s=f"{values['tokens_per_second']:.0f}",
                    mfu=f"{100 * values['mfu']:.1f}%",
                )  # fmt: skip
                progress.update()
        saved = bool(trainer.save_interval and (step + 1) % trainer.save_interval == 0) or step + 1 == trainer.stop_at
        if saved:
            save_checkpoint(config, run_dir, step + 1, model, optimizer, batches, required=step + 1 == stop)
        if stop_request.agreed(device) and step + 1 < stop:
            if not saved:
                save_checkpoint(config, run_dir, step + 1, model, optimizer, batches, required=True)
            if rank_zero:
                if progress is not None:
                    progress.close()
                writer.close()
                print(
                    f"stop signal ({stop_request.signal_name or 'on another rank'}) after step {step + 1}: "
                    f"saved {run_dir}/checkpoints/{checkpoint_name(step + 1)}; exit {PREEMPTED_EXIT_CODE} to requeue",
                    file=sys.stderr,
                )
            return True
    if stop == trainer.max_steps:
        save_weights(model, run_dir / "final")
    if rank_zero and stop > start_step:
        if progress is not None:
            progress.close()
        writer.write(stop, {"peak_memory_gib": peak_memory_gib(device)})
        writer.close()
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
        outputs = "final/" if stop == trainer.max_steps else f"checkpoints/{checkpoint_name(stop)}"
        print(
            f"trained to step {stop} ({tokens_seen:,} tokens), final loss {losses.ce:.4f}, "
            f"peak memory {peak_memory_gib(device):.2f} GiB; wrote {run_dir}/metrics.jsonl, loss.png, {outputs}"
        )
    return False


def resume(config: Config, run_dir: Path, model: ParallelOLMo, optimizer, batches: GlobalBatches) -> int:
    """Restore model, optimizer and data position per trainer.resume; returns the step to continue from."""
    choice = config.trainer.resume
    if is_rank_zero():
        remove_incomplete(run_dir / "checkpoints")
    if choice == "none":
        return 0
    path = find_resume_point(run_dir / "checkpoints") if choice == "auto" else Path(choice)
    if path is None:
        return 0
    state = sharded_checkpoint.load(path, model, optimizer)
    batches.load_state_dict(state["data"])
    if is_rank_zero():
        print(f"resumed from {path} at step {state['step']}")
    return state["step"]


def save_checkpoint(config, run_dir, step, model, optimizer, batches, required: bool) -> None:
    """A sharded checkpoint of everything the run needs to continue; a failed save (e.g. a full disk) keeps
    training unless this checkpoint is the one the run ends on."""
    trainer = config.trainer
    state = {"step": step, "data": batches.state_dict()}
    try:
        sharded_checkpoint.save(
            run_dir / "checkpoints", step, model, optimizer, state, trainer.keep_last, trainer.keep_every
        )
    except CheckpointError as err:
        if required:
            raise
        if is_rank_zero():
            print(f"warning: {err}; training goes on", file=sys.stderr)


def keep_metrics_until(path: Path, step: int) -> None:
    """A fresh run starts an empty metrics.jsonl; a resumed one keeps what was logged up to its checkpoint."""
    if step == 0 or not path.is_file():
        path.unlink(missing_ok=True)
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def save_weights(model: ParallelOLMo, path: Path) -> None:
    """A consolidated checkpoint (megaolmo.load reads it), gathered to rank 0 from every stage."""
    state = model.consolidated_state()
    if state is not None:
        save_consolidated(path, model.config, state, overwrite=True)
    if dist.is_initialized():
        dist.barrier()


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    stop_request = StopRequest()
    clean = preempted = False
    try:
        preempted = train(OmegaConf.to_object(cfg), stop_request)
        clean = True
    except (ConfigError, DataError, CheckpointError, EvalError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        stop_request.restore()
        shutdown(clean)
    if preempted:
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    if not is_rank_zero() and not any(arg.startswith("hydra.output_subdir=") for arg in sys.argv[1:]):
        sys.argv.append("hydra.output_subdir=null")  # rank 0 records the composed config; the others need not
    # Run the entry point of the importable module, not of __main__: a Slurm sweep (submitit) pickles the
    # task function, by reference when it lives in a module a job can import.
    importlib.import_module("megaolmo.train").main()
