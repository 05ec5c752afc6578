"""Evaluation on a model sharded over TP x PP x DP: a checkpoint loaded into a layout, and the scorer that runs it.

The training loop evaluates its model as it is sharded, and `python -m megaolmo.eval --tp N --pp N` builds
the same sharded model from a checkpoint, so a model too big for one GPU (OLMo-65B is ~130 GB in bf16) is
evaluated on the layout it trained on. Rows go to the parallel model in fixed-shape chunks of
`micro_batch_size x max(pp, 1)` rows per DP rank, the last chunk padded with rows that score nothing; the
model gives per-token cross entropy even when its vocabulary is split across TP ranks, so a row's
log-probability is minus the summed cross entropy of its scored tokens. Every rank scores every row
through the scorer, which splits them over DP and gathers the results, so every rank ends with the same
numbers, whatever the layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megaolmo.checkpoint import open_tensors
from megaolmo.checkpoint.initialize import initialize_weights
from megaolmo.config import ParallelConfig, sequence_multiple
from megaolmo.data import IGNORE_INDEX
from megaolmo.data.dataset import dp_rows
from megaolmo.errors import EvalError
from megaolmo.eval.scoring import Row, Scorer
from megaolmo.model.engine import ParallelOLMo


def load_sharded_model(
    path: str | Path, *, tp: int, pp: int, cp: int = 1, device: torch.device, dtype: torch.dtype
) -> ParallelOLMo:
    """The checkpoint's model laid out over this job's ranks as tp x cp x pp x (the rest data parallel); under
    context parallelism (`cp`) each row's tokens are split over cp ranks, for contexts one GPU cannot hold.

    Collective. Each rank reads only its share of the weights (any checkpoint layout, either format), as a
    run started from `trainer.init_from` does. Parameters are held in fp32 and computed in `dtype`: FSDP
    casts as it gathers when there is data parallelism, one copy per stage forward otherwise.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % (tp * pp * cp):
        cp_term = f" x --cp {cp}" if cp > 1 else ""
        raise EvalError(
            f"--tp {tp} x --pp {pp}{cp_term} = {tp * pp * cp} does not divide the {world} ranks; launch a multiple "
            f"of {tp * pp * cp} ranks (torchrun --nproc-per-node) or change --tp/--pp/--cp"
        )
    try:
        config = open_tensors(path).config
    except FileNotFoundError as err:
        raise EvalError(str(err)) from None
    rows = config.padded_vocab_size  # the checkpoint's embedding rows, kept: TP would pad to 128 x tp by default
    if rows % tp:
        raise EvalError(
            f"the checkpoint's embedding has {rows} rows, which --tp {tp} cannot split; use a --tp dividing {rows}"
        )
    config = dataclasses.replace(config, embedding_size=rows)
    if cp > 1:
        config = dataclasses.replace(config, attention="sdpa", compile=False)  # what the CP ring computes with
    model = ParallelOLMo(config, ParallelConfig(tp=tp, pp=pp, cp=cp, device=device.type), param_dtype=dtype)
    initialize_weights(path, model)
    return model


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


def parallel_scorer(model: ParallelOLMo, micro_batch_size: int, pad_id: int) -> Scorer:
    """A scorer (rows -> summed log-probabilities) running `model` on fixed-shape batches of full context width."""
    width = model.config.max_sequence_length
    width -= width % sequence_multiple(model.parallel)  # the lengths SP and CP split

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
