"""Evaluation inside the training loop, on the model as it is sharded (any TP x PP x DP).

Held-out loss, perplexity and bits per byte per source, and the downstream tasks, both fed to the
parallel model in fixed-shape chunks of `micro_batch_size x max(pp, 1)` rows per DP rank, the last
chunk padded with rows that score nothing. The parallel model gives per-token cross entropy even when
its vocabulary is split across TP ranks, so a downstream row's log-probability is minus the summed
cross entropy of its scored tokens. Every rank ends with the same numbers, whatever the layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megaolmo.data import IGNORE_INDEX, MemmapDataset, eos_id, load_tokenizer
from megaolmo.data.dataset import dp_rows
from megaolmo.eval.downstream import evaluate_tasks
from megaolmo.eval.scoring import Row
from megaolmo.eval.tasks import load_tasks
from megaolmo.model.engine import ParallelOLMo


def dp_chunks(
    model: ParallelOLMo,
    n_rows: int,
    rows: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
    micro_batch_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(this DP rank's token ids, its labels, real rows in the chunk) for each fixed-shape chunk of `n_rows`
    rows, where `rows(start, stop)` gives (token ids, labels) of rows [start, stop). Every chunk holds
    micro_batch_size x max(pp, 1) rows per DP rank, the last one padded with rows that score nothing."""
    dp = model.mesh.dp
    chunk = micro_batch_size * max(model.parallel.pp, 1) * dp
    for start in range(0, n_rows, chunk):
        ids, targets = rows(start, min(start + chunk, n_rows))
        real, padding = len(ids), chunk - len(ids)
        if padding:
            ids = torch.cat([ids, torch.zeros(padding, ids.shape[1], dtype=ids.dtype)])
            targets = torch.cat([targets, torch.full((padding, targets.shape[1]), IGNORE_INDEX, dtype=targets.dtype)])
        share = dp_rows(chunk, model.mesh.dp_rank, dp)
        yield ids[share], targets[share], real


def held_out_metrics(
    model: ParallelOLMo, sources: dict[str, MemmapDataset], *, instances: int, micro_batch_size: int
) -> dict[str, float]:
    """Loss, perplexity and bits per byte per held-out source, on its first `instances` instances (the same
    ones for every layout)."""
    metrics = {}
    for source, dataset in sources.items():
        count = min(len(dataset), instances)
        if count == 0:
            continue

        def rows(start: int, stop: int, dataset: MemmapDataset = dataset) -> tuple[torch.Tensor, torch.Tensor]:
            batch = dataset.get_batch(range(start, stop))
            return batch.input_ids, batch.labels()

        nll, tokens = 0.0, 0
        for ids, labels, _ in dp_chunks(model, count, rows, micro_batch_size):
            chunk_nll, chunk_tokens = model.evaluate(ids, labels, micro_batch_size)
            nll, tokens = nll + chunk_nll, tokens + chunk_tokens
        loss = nll / tokens
        metrics[f"eval/{source}/loss"] = loss
        metrics[f"eval/{source}/perplexity"] = math.exp(min(loss, 50.0))
        if dataset.bytes_per_token:
            metrics[f"eval/{source}/bits_per_byte"] = loss / math.log(2) / dataset.bytes_per_token
    return metrics


def parallel_scorer(model: ParallelOLMo, micro_batch_size: int, pad_id: int):
    """A scorer (rows -> summed log-probabilities) running `model` on fixed-shape batches."""
    width = model.config.max_sequence_length
    if model.parallel.sequence_parallel:
        width -= width % model.mesh.tp

    def batch(rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and labels of `rows`, padded to the fixed width; only the scored tokens have labels."""
        inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row.tokens) - 1
            inputs[b, :n] = torch.tensor(row.tokens[:-1])
            labels[b, n - row.n_scored : n] = torch.tensor(row.tokens[-row.n_scored :])
        return inputs, labels

    def score(rows: Sequence[Row]) -> list[float]:
        scores: list[float] = []
        chunks = dp_chunks(model, len(rows), lambda start, stop: batch(rows[start:stop]), micro_batch_size)
        for ids, targets, real in chunks:
            losses = model.row_losses(ids, targets, micro_batch_size)
            if model.mesh.dp_group is not None:
                local = losses.to(model.mesh.device)  # inputs and outputs on the mesh's device (NCCL)
                gathered = [torch.empty_like(local) for _ in range(model.mesh.dp)]
                dist.all_gather(gathered, local, group=model.mesh.dp_group)
                losses = torch.cat([t.cpu() for t in gathered])
            scores += [-float(loss) for loss in losses[:real].double()]
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


class InLoopEvaluator:
    """Everything the loop evaluates every `trainer.eval_interval` steps: held-out sources, downstream tasks."""

    def __init__(
        self, sources: dict[str, MemmapDataset], *, instances: int, downstream: InLoopDownstream | None
    ) -> None:
        self.sources, self.instances, self.downstream = sources, instances, downstream

    def __call__(self, model: ParallelOLMo, micro_batch_size: int) -> dict[str, float]:
        metrics = held_out_metrics(model, self.sources, instances=self.instances, micro_batch_size=micro_batch_size)
        if self.downstream is not None:
            metrics.update(self.downstream(model, micro_batch_size))
        return metrics
