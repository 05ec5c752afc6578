"""The last pipeline stage's loss: per-token cross entropy and log-sum-exp from the final hidden states.

The loss is computed inside the last stage's forward, from the output layer's input and its weight, so
that it may never hold the whole logits: with `chunk_tokens`, the head's GEMM and the (vocab-parallel)
cross entropy run that many tokens at a time (megaolmo.parallel.cross_entropy), in forward and again in
backward, and the fp32 `[tokens, vocab / tp]` logits, softmax and their gradients exist only a chunk at a
time. Without it the whole logits are formed, as the head's plain forward does. Both give the same per-token
numbers; the engine turns them into the step's loss (and z-loss, from the log-sum-exp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megaolmo.data.labels import IGNORE_INDEX
from megaolmo.parallel.cross_entropy import chunked_linear_cross_entropy, vocab_parallel_cross_entropy
from megaolmo.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding


@dataclass(frozen=True)
class TokenLosses:
    """How the last stage scores its targets: `chunk_tokens` tokens of logits at a time, or all at once (None);
    `with_log_z` computes the log-sum-exp that OLMo's z-loss needs where it is not free (one process)."""

    chunk_tokens: int | None = None
    with_log_z: bool = False
    ignore_index: int = IGNORE_INDEX  # the targets that score nothing (the engine's, whose loss sums the rest)

    def __call__(
        self, head: ColumnParallelLinear | VocabParallelEmbedding, hidden: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """[b, s, 2] fp32 from final hidden states [b, s, d] and targets [b, s]: per token, the cross entropy (0 for
        ignored targets) and the log-sum-exp of its logits over the whole vocabulary (0 when not asked for)."""
        group = None if head.tp is None else head.tp.group
        vocab_start = head.vocab_start  # 0 without TP

        def losses(local_hidden: torch.Tensor) -> torch.Tensor:
            if self.chunk_tokens is not None:
                ce, log_z = chunked_linear_cross_entropy(
                    local_hidden,
                    head.weight,
                    labels,
                    vocab_start,
                    group=group,
                    ignore_index=self.ignore_index,
                    chunk_tokens=self.chunk_tokens,
                )
            else:
                logits = F.linear(local_hidden, head.weight)
                ce, log_z = vocab_parallel_cross_entropy(
                    logits, labels, vocab_start, group=group, ignore_index=self.ignore_index, with_log_z=self.with_log_z
                )
                log_z = torch.zeros_like(ce) if log_z is None else log_z
            return torch.stack([ce, log_z.float()], dim=-1)

        if isinstance(head, VocabParallelEmbedding):
            return head.logits_with(hidden, 1, losses)
        return head.forward_with(hidden, losses)
