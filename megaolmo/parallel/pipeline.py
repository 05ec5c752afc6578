"""Pipeline parallelism: which blocks each stage holds, stage placement, and the schedules.

The schedules themselves are `torch.distributed.pipelining`'s. Stage i of
pp * vp runs on pipeline rank i % pp, so with virtual stages (interleaved
schedules) every rank holds vp non-adjacent slices of the model.
"""

from __future__ import annotations

import inspect
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


class Schedule:
    """A `torch.distributed.pipelining` schedule, run one way whatever the installed torch's schedules accept.

    Read once, when the schedule is built: whether `step` takes `return_outputs` (then the last stage drops
    each micro-batch's logits, m x [b, s, V / tp], instead of merging them into a return value nobody reads)
    and whether there is `eval` (forward only). A torch without them gets the step that keeps its outputs
    until it returns, and for `eval` what `eval` itself does: a step with the backward switched off. Older
    schedules pass unknown keywords on to the stage modules, so `return_outputs` is never sent blind.

    `stage_kwargs` reach the forward of every stage, not only the first: each schedule splits them into
    micro-batches by rows, as it splits the inputs, and hands a stage the slice of the micro-batch it runs
    by that micro-batch's index (`forward_one_chunk(mb_index, ..., kwarg_mbs[mb_index])` in 1F1B, GPipe and
    the interleaved runtime alike), so no stage relies on the order its micro-batches come in. Being local
    to the stage they are neither sent between stages nor given gradients.
    """

    def __init__(self, schedule) -> None:
        self.schedule = schedule
        self.drops_outputs = "return_outputs" in inspect.signature(schedule.step).parameters
        self.has_eval = callable(getattr(schedule, "eval", None))

    def step(self, *args, target: torch.Tensor | None, **stage_kwargs: torch.Tensor) -> None:
        """Forward and backward of one batch; the losses reach only the loss function."""
        if self.drops_outputs:
            self.schedule.step(*args, target=target, return_outputs=False, **stage_kwargs)
        else:
            self.schedule.step(*args, target=target, **stage_kwargs)

    def eval(self, *args, target: torch.Tensor | None, **stage_kwargs: torch.Tensor) -> None:
        """Forward only, losses included (called under torch.no_grad)."""
        if self.has_eval:
            self.schedule.eval(*args, target=target, **stage_kwargs)
            return
        has_backward, self.schedule._has_backward = self.schedule._has_backward, False
        try:
            self.schedule.step(*args, target=target, **stage_kwargs)
        finally:
            self.schedule._has_backward = has_backward


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
) -> Schedule:
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
    own = stages if name == "interleaved_1f1b" else stages[0]  # multi-stage schedules take them all
    return Schedule(schedule_class(own, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False))
