"""The downstream evaluator inside the training loop, on the model as it is sharded (any TP x PP x DP).

The parallel model gives per-token cross entropy even when its vocabulary is split across TP ranks,
so a row's log-probability is minus the summed cross entropy of its scored tokens: rows become
fixed-width batches with labels only on the scored tokens, split over the DP ranks like training
batches. Every rank ends with every row's score, so all ranks agree on the accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megaolmo.data import eos_id, load_tokenizer
from megaolmo.eval.downstream import evaluate_tasks
from megaolmo.eval.scoring import Row
from megaolmo.eval.tasks import load_tasks
from megaolmo.model.parallelize import ParallelOLMo

IGNORE = -100


def parallel_scorer(model: ParallelOLMo, micro_batch_size: int, pad_id: int):
    """A scorer (rows -> summed log-probabilities) running `model` on fixed-shape batches."""
    width = model.config.max_sequence_length
    if model.parallel.sequence_parallel:
        width -= width % model.mesh.tp
    dp, per_rank = model.mesh.dp, micro_batch_size * max(model.parallel.pp, 1)

    def score(rows: Sequence[Row]) -> list[float]:
        scores: list[float] = []
        chunk = per_rank * dp
        for start in range(0, len(rows), chunk):
            batch = rows[start : start + chunk]
            inputs = torch.full((chunk, width), pad_id, dtype=torch.long)
            labels = torch.full((chunk, width), IGNORE, dtype=torch.long)
            for b, row in enumerate(batch):
                n = len(row.tokens) - 1
                inputs[b, :n] = torch.tensor(row.tokens[:-1])
                labels[b, n - row.n_scored : n] = torch.tensor(row.tokens[-row.n_scored :])
            share = slice(model.mesh.dp_rank * per_rank, (model.mesh.dp_rank + 1) * per_rank)
            losses = model.row_losses(inputs[share], labels[share], micro_batch_size)
            if model.mesh.dp_group is not None:
                gathered = [torch.empty_like(losses) for _ in range(dp)]
                dist.all_gather(gathered, losses.to(model.mesh.device), group=model.mesh.dp_group)
                losses = torch.cat([t.cpu() for t in gathered])
            scores += [-float(loss) for loss in losses[: len(batch)].double()]
        return scores

    return score


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
