"""Spawned gloo ranks running ring attention alone, against attention over the whole sequence on each rank."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_groups import run_each_on_its_group

from megaolmo.parallel.context import ContextParallel, SequenceShard, ring_attention, zigzag_split

SEQ_LEN, BATCH, HEADS, KV_HEADS, HEAD_DIM = 48, 2, 4, 2, 8
# Documents end after these tokens (the rows differ): short ones, one crossing every chunk, one ending a row.
DOCUMENT_ENDS = [[2, 3, 17, 30, 47], [11, 12, 40]]


@dataclass
class Case:
    name: str
    cp: int
    window: int | None = None
    documents: bool = False

    @property
    def world_size(self) -> int:
        return self.cp


def doc_positions() -> torch.Tensor:
    """[b, s]: each token's position in its document."""
    positions = torch.zeros(BATCH, SEQ_LEN, dtype=torch.int64)
    for row, ends in enumerate(DOCUMENT_ENDS):
        start = 0
        for end in ends:
            positions[row, start : end + 1] = torch.arange(end + 1 - start)
            start = end + 1
    return positions


def reference_mask(window: int | None, documents: bool) -> torch.Tensor:
    """[b, 1, s, s] bool: causal, within the window, within the document."""
    i = torch.arange(SEQ_LEN)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    allowed = allowed.expand(BATCH, 1, SEQ_LEN, SEQ_LEN)
    if documents:
        document = (doc_positions() == 0).cumsum(1)
        allowed = allowed & (document[:, None, :, None] == document[:, None, None, :])
    return allowed


def run_case(case: Case, target: Path) -> None:
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad = (
        torch.randn(BATCH, heads, SEQ_LEN, HEAD_DIM, generator=generator, dtype=torch.float64)
        for heads in (HEADS, KV_HEADS, KV_HEADS, HEADS)
    )
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = reference_mask(case.window, case.documents)
    expected = F.scaled_dot_product_attention(*whole, attn_mask=mask, enable_gqa=True)
    expected.backward(grad)

    cp = ContextParallel(dist.group.WORLD, case.cp, rank)
    shard = SequenceShard(cp, SEQ_LEN // case.cp, q.device, doc_positions() if case.documents else None)
    local = [zigzag_split(t, case.cp, rank, dim=2).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, shard, case.window)
    out.backward(zigzag_split(grad, case.cp, rank, dim=2))
    errors = {"out": (out - zigzag_split(expected, case.cp, rank, dim=2)).abs().max().item()}
    for name, got, want in zip("qkv", local, whole):
        errors[f"d{name}"] = (got.grad - zigzag_split(want.grad, case.cp, rank, dim=2)).abs().max().item()
    (target / f"rank{rank}.json").write_text(json.dumps(errors))


def run_cases(rank: int, cases: list[dict], out_dir: str) -> None:
    run_each_on_its_group(rank, [Case(**case) for case in cases], out_dir, run_case)
