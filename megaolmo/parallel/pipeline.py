"""Pipeline parallelism: which blocks each stage holds, stage placement, and the schedules.

The schedules themselves are `torch.distributed.pipelining`'s. Stage i of
pp * vp runs on pipeline rank i % pp, so with virtual stages (interleaved
schedules) every rank holds vp non-adjacent slices of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

SCHEDULES = {
    "1f1b": Schedule1F1B,
    "gpipe": ScheduleGPipe,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
}


def stage_layer_ranges(counts: Sequence[int]) -> list[range]:
    """The blocks of each stage, from the number of blocks of each (megaolmo.config.stage_layer_counts)."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [range(start, start + count) for start, count in zip(starts, counts)]


def stages_of_rank(pp_rank: int, pp: int, vp: int) -> list[int]:
    """The global stage indices pipeline rank `pp_rank` runs (one per virtual stage)."""
    return [pp_rank + v * pp for v in range(vp)]


def build_schedule(
    name: str,
    *,
    modules: list[nn.Module],
    stage_ids: list[int],
    n_stages: int,
    device: torch.device,
    group: ProcessGroup,
    example_inputs: list[torch.Tensor],
    example_outputs: list[torch.Tensor],
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
):
    """A `torch.distributed.pipelining` schedule over this rank's stage modules.

    Example tensors (one micro-batch) fix the shapes sent between stages up
    front, so no shape-inference pass runs the model. Gradients are not scaled
    by the schedule: `loss_fn` already divides by the tokens of the whole batch.
    """
    stages = [
        PipelineStage(module, stage_id, n_stages, device, input_args=inputs, output_args=outputs, group=group)
        for module, stage_id, inputs, outputs in zip(modules, stage_ids, example_inputs, example_outputs)
    ]
    schedule_class = SCHEDULES[name]
    if name == "interleaved_1f1b":
        return schedule_class(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule_class(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
