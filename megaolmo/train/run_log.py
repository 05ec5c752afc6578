"""What a run writes down and shows, on rank 0 only: metrics.jsonl, TensorBoard, W&B, the progress bar,
the loss plot and the closing summary. On every other rank `RunLog` does nothing, so the loop has no
branches for rank 0.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from megaolmo.errors import ConfigError


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
                raise ConfigError(
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


def keep_metrics_until(path: Path, step: int) -> None:
    """A fresh run starts an empty metrics.jsonl; a resumed one keeps what was logged up to its checkpoint."""
    if step == 0 or not path.is_file():
        path.unlink(missing_ok=True)
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


class RunLog:
    """Rank 0's record of a run from `start_step` to `stop`: metrics every `log_interval` steps (and every
    evaluation and the last step), the progress bar, and at the end the loss plot and a summary line."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        start_step: int,
        stop: int,
        log_interval: int,
        tensorboard: bool,
        wandb_project: str | None,
        progress: bool,
        config: dict,
    ) -> None:
        self.run_dir, self.enabled, self.stop, self.log_interval = run_dir, enabled, stop, log_interval
        self.writer, self.progress = None, None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        keep_metrics_until(run_dir / "metrics.jsonl", start_step)
        self.writer = MetricsWriter(run_dir, tensorboard, wandb_project, config)
        if progress:
            from tqdm import tqdm

            self.progress = tqdm(total=stop, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Record the metrics after `step` optimizer steps and move the progress bar."""
        if not self.enabled:
            return
        evaluated = any(key.startswith("eval/") for key in values)
        if step % self.log_interval == 0 or step == self.stop or evaluated:
            self.writer.write(step, values)
        if self.progress is not None:
            self.progress.set_postfix(
                loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}", tok_s=f"{values['tokens_per_second']:.0f}",
                mfu=f"{100 * values['mfu']:.1f}%",
            )  # fmt: skip
            self.progress.update()

    def close(self, message: str = "", *, final_values: dict[str, float] | None = None, error: bool = False) -> None:
        """End the record: `final_values` logged at the last step and the loss plotted (a finished leg), then
        `message` printed, if any (to stderr when `error`)."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.close()
        if final_values is not None:
            self.writer.write(self.stop, final_values)
        self.writer.close()
        if final_values is not None:
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        if message:
            print(message, file=sys.stderr if error else sys.stdout)
