"""A run's checkpoints: where they go, when they are due, which ones it keeps, and resuming from them.

Built once per run from `trainer.*`: sharded checkpoints every `save_interval`
steps and at `stop_at` under <run_dir>/checkpoints/, retention by `keep_last`
and `keep_every`, the resume point by `resume` (auto, none or a path), a fresh
run's weights by `init_from` (another run's or a converted model's), and the
final weights in <run_dir>/final/ (sharded the same way, each rank writing its
share). A periodic save that fails (a full disk, a quota) warns and training
goes on; the save a leg ends on must succeed, or the run stops with the error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from megaolmo.checkpoint import restore_sharded, save_sharded
from megaolmo.checkpoint.directory import checkpoint_name, find_resume_point, remove_incomplete
from megaolmo.checkpoint.initialize import initialize_weights
from megaolmo.checkpoint.sharded import save_final_weights
from megaolmo.config import TrainerConfig
from megaolmo.data import GlobalBatches
from megaolmo.errors import CheckpointError
from megaolmo.model.engine import ParallelOLMo
from megaolmo.parallel.launch import is_rank_zero


class Checkpointer:
    """Saves and restores everything a run needs to continue: model, AdamW state, the data position."""

    def __init__(self, run_dir: Path, trainer: TrainerConfig) -> None:
        self.directory = run_dir / "checkpoints"
        self.final = run_dir / "final"
        self.trainer = trainer

    def path(self, step: int) -> Path:
        return self.directory / checkpoint_name(step)

    def due(self, step: int) -> bool:
        """Whether the checkpoint after `step` optimizer steps is one the config asks for."""
        interval = self.trainer.save_interval
        return bool(interval and step % interval == 0) or step == self.trainer.stop_at

    def resume(self, model: ParallelOLMo, optimizer: torch.optim.Optimizer, batches: GlobalBatches) -> int:
        """Restore model, optimizer and data position per trainer.resume; returns the step to continue from.

        A run with nothing to resume starts from `trainer.init_from`'s weights when it is given.
        """
        if is_rank_zero():
            remove_incomplete(self.directory)
        choice = self.trainer.resume
        path = None if choice == "none" else find_resume_point(self.directory) if choice == "auto" else Path(choice)
        if path is None:
            self._initialize(model)
            return 0
        state = restore_sharded(path, model, optimizer)
        batches.load_state_dict(state["data"])
        if is_rank_zero():
            print(f"resumed from {path} at step {state['step']}")
        return state["step"]

    def _initialize(self, model: ParallelOLMo) -> None:
        """A fresh run's weights from `trainer.init_from` (a resumed run has its own)."""
        source = self.trainer.init_from
        if source is None:
            return
        if not Path(source).is_dir():
            raise CheckpointError(
                f"trainer.init_from={source} is not a directory; give a checkpoint (a run's checkpoints/stepN or "
                "final/, or what python -m megaolmo.convert from-hf wrote)"
            )
        differences = initialize_weights(source, model)
        if is_rank_zero():
            print(f"initialized the weights from {source}" + (f" ({', '.join(differences)})" if differences else ""))

    def save(
        self,
        step: int,
        model: ParallelOLMo,
        optimizer: torch.optim.Optimizer,
        batches: GlobalBatches,
        *,
        required: bool,
    ) -> None:
        """A sharded checkpoint after `step` steps (collective); a failure raises only when `required`."""
        try:
            save_sharded(
                self.directory,
                step,
                model=model,
                optimizer=optimizer,
                trainer_state={"step": step, "data": batches.state_dict()},
                keep_last=self.trainer.keep_last,
                keep_every=self.trainer.keep_every,
            )
        except CheckpointError as err:
            if required:
                raise
            if is_rank_zero():
                print(f"warning: {err}; training goes on", file=sys.stderr)

    def save_final(self, model: ParallelOLMo, step: int) -> None:
        """The finished run's fp32 weights, each rank writing its share (collective); `megaolmo.load` and
        `python -m megaolmo.convert` read them."""
        save_final_weights(self.final, model, step=step)
