"""What a run reports: FLOPs and MFU, metrics.jsonl, TensorBoard, W&B, and the loss plot."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch

from megaolmo.config import ClusterConfig, ModelConfig


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + 12 x layers x d_model x seq_len (attention)."""
    return 6 * model.num_params(include_embedding=False) + 12 * model.n_layers * model.d_model * seq_len


def measured_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Dense matmul FLOP/s this device reaches, for MFU where no datasheet peak is configured."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - start)


def peak_flops_per_device(cluster: ClusterConfig, device: torch.device, dtype: torch.dtype) -> float:
    if cluster.peak_tflops is not None:
        return cluster.peak_tflops * 1e12
    return measured_peak_flops(device, dtype)


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsWriter:
    """metrics.jsonl (one object per logged step), TensorBoard scalars and optionally W&B; rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool, wandb_project: str | None, config: dict) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        self.wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb_project is not None:
            try:
                import wandb
            except ImportError:
                raise RuntimeError(
                    f"trainer.wandb_project={wandb_project} needs wandb: pip install wandb, or unset it"
                ) from None
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config)

    def write(self, step: int, values: dict[str, float | int | None]) -> None:
        record = {"step": step, **values}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training loss, and held-out loss per source, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    figure, axes = plt.subplots(figsize=(8, 5))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if train:
        axes.plot(*zip(*train), label="train")
    eval_keys = sorted({key for r in records for key in r if key.startswith("eval/") and key.endswith("/loss")})
    for key in eval_keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        axes.plot(*zip(*points), marker="o", linestyle="--", label=key.removeprefix("eval/").removesuffix("/loss"))
    axes.set_xlabel("step")
    axes.set_ylabel("cross entropy (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
