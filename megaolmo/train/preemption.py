"""Stopping at a step boundary when the scheduler asks, so that a requeued job loses no work.

Slurm sends SIGUSR1 ahead of the time limit (`#SBATCH --signal=USR1@600`) and
SIGTERM when it preempts or cancels a job. Either one makes the run finish the
step in flight, save a checkpoint and exit with `PREEMPTED_EXIT_CODE`, which
the sbatch scripts in slurm/ answer with `scontrol requeue`; the requeued job
resumes from that checkpoint (`trainer.resume=auto`).

Ranks see the signal at slightly different moments (or only some see it), so
they agree on stopping through a MAX all-reduce once per step: every rank
stops after the same step, and the checkpoint is collective.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: "try again later", i.e. requeue and resume
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Remembers a stop signal instead of dying on it; `agreed` tells every rank whether any rank got one."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {signum: signal.signal(signum, self._receive) for signum in STOP_SIGNALS}

    def _receive(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        # A second SIGTERM (e.g. Slurm's KillWait expiring on a hung step) kills as usual.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was signalled; a collective, so every rank calls it at the same step."""
        flag = torch.tensor([self.signal_name is not None], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        """Give the signals back the handlers they had (a launcher's, or the default) once training is over."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
