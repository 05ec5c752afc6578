"""Evaluation inside the training loop, on the model as it is sharded (any TP x PP x DP).

Held-out loss, perplexity and bits per byte per group (source, or source/domain), and the downstream
tasks, fed to the parallel model in fixed-shape chunks (megaolmo.eval.sharded), so every rank ends with
the same numbers, whatever the layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from megaolmo.data import eos_id, load_tokenizer
from megaolmo.data.held_out import HeldOutGroup
from megaolmo.eval.downstream import evaluate_tasks
from megaolmo.eval.sharded import dp_chunks, parallel_scorer
from megaolmo.eval.tasks import load_tasks
from megaolmo.model.engine import ParallelOLMo


def held_out_metrics(
    model: ParallelOLMo, groups: dict[str, HeldOutGroup], *, instances: int, micro_batch_size: int
) -> dict[str, float]:
    """Loss, perplexity and bits per byte per held-out group (megaolmo.data.held_out), on its first
    `instances` instances: the same rows on every rank and every layout. Bits per byte divides the summed
    NLL by the UTF-8 bytes of exactly the targets scored, so it is exact for any slice of the data."""
    metrics = {}
    for name, group in groups.items():
        count = min(len(group), instances)
        if count == 0:
            continue

        def rows(start: int, stop: int, group: HeldOutGroup = group) -> tuple[torch.Tensor, torch.Tensor]:
            batch = group.get_batch(range(start, stop))
            return batch.input_ids, batch.labels()

        nll, tokens = 0.0, 0
        for ids, labels, _ in dp_chunks(model, count, rows, micro_batch_size):
            chunk_nll, chunk_tokens = model.evaluate(ids, labels, micro_batch_size)
            nll, tokens = nll + chunk_nll, tokens + chunk_tokens
        loss = nll / tokens
        metrics[f"eval/{name}/loss"] = loss
        metrics[f"eval/{name}/perplexity"] = math.exp(min(loss, 50.0))
        target_bytes = group.target_bytes(count)
        if target_bytes:
            metrics[f"eval/{name}/bits_per_byte"] = nll / math.log(2) / target_bytes
    return metrics


class InLoopDownstream:
    """Task files and tokenizer read once; called every evaluation with the training model."""

    def __init__(self, task_paths: Sequence[str], tokenizer_path: Path, limit: int | None) -> None:
        self.tasks = load_tasks(task_paths, limit)
        self.tokenizer = load_tokenizer(tokenizer_path)

    def __call__(self, model: ParallelOLMo, micro_batch_size: int) -> dict[str, float]:
        scorer = parallel_scorer(model, micro_batch_size, eos_id(self.tokenizer))
        results = evaluate_tasks(model, self.tokenizer, self.tasks, scorer=scorer)
        metrics = {f"eval/downstream/{name}/accuracy": task["accuracy"] for name, task in results["tasks"].items()}
        metrics["eval/downstream/average"] = results["average"]
        return metrics


class InLoopEvaluator:
    """Everything the loop evaluates every `trainer.eval_interval` steps: held-out sources, downstream tasks."""

    def __init__(
        self, sources: dict[str, HeldOutGroup], *, instances: int, downstream: InLoopDownstream | None
    ) -> None:
        self.sources, self.instances, self.downstream = sources, instances, downstream

    def __call__(self, model: ParallelOLMo, micro_batch_size: int) -> dict[str, float]:
        metrics = held_out_metrics(model, self.sources, instances=self.instances, micro_batch_size=micro_batch_size)
        if self.downstream is not None:
            metrics.update(self.downstream(model, micro_batch_size))
        return metrics
