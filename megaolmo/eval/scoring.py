"""The forward pass both evaluators share: summed log-probabilities of chosen tokens, rows padded into batches.

A row is a token sequence whose last `n_scored` tokens are scored: the model reads `tokens[:-1]` and each
scored token is predicted from everything before it in the row. Perplexity windows and multiple-choice
continuations are both rows, so both evaluators use one code path, which is also the path the
cross-check against transformers exercises.

Rows are right-padded: attention is causal, so padding after a row's last token cannot change its
log-probabilities, and no attention mask is needed (the model takes none). Rows are sorted longest first,
so a batch that does not fit in memory fails at once rather than at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

Model = Callable[[torch.Tensor], torch.Tensor]  # token ids [b, s] int64 -> logits [b, s, padded vocab]
Scorer = Callable[[Sequence["Row"]], list[float]]  # rows -> summed log-probability of each row's scored tokens


@dataclass(frozen=True)
class Row:
    """`tokens[-n_scored:]` are scored, each from all the tokens before it in `tokens`."""

    tokens: tuple[int, ...]
    n_scored: int

    def __post_init__(self) -> None:
        if not 1 <= self.n_scored < len(self.tokens):
            raise ValueError(f"a row of {len(self.tokens)} tokens cannot score {self.n_scored}: it needs context")


@torch.no_grad()
def score_rows(
    model: Model,
    rows: Sequence[Row],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = False,
    desc: str = "scoring",
) -> list[float]:
    """The summed natural-log probability of each row's scored tokens, in the order of `rows`.

    Log-softmax runs in fp32 over the whole padded vocabulary, as transformers and OLMo do, whatever the
    model's dtype; sums are Python floats (float64), so millions of tokens add up without drift.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].tokens), reverse=True)
    results = [0.0] * len(rows)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
        batch = [rows[i] for i in order[start : start + batch_size]]
        width = max(len(row.tokens) for row in batch) - 1
        inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for b, row in enumerate(batch):
            inputs[b, : len(row.tokens) - 1] = torch.tensor(row.tokens[:-1])
        logits = model(inputs.to(device))
        for b, row in enumerate(batch):
            n = len(row.tokens) - 1
            scored = logits[b, n - row.n_scored : n].float()
            targets = torch.tensor(row.tokens[-row.n_scored :], device=scored.device)
            logprobs = F.log_softmax(scored, dim=-1).gather(-1, targets[:, None])
            results[order[start + b]] = float(logprobs.double().sum())
    return results
