"""Cross entropy over logits whose vocabulary is split across the TP group, without gathering them.

Each rank holds logits[..., vocab_start : vocab_start + V/tp]. Three all-reduces
over [tokens] (max, sum of exp, target logit) give the exact loss; the gradient
is softmax - one_hot on the local slice. The log-sum-exp is returned as well,
so OLMo's z-loss (`mult * logsumexp^2`) is a differentiable function of it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup


def _all_reduce(x: torch.Tensor, group: ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group, ignore_index):
        ctx.logits_dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32
        row_max = _all_reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
        shifted = logits - row_max.unsqueeze(-1)
        local = labels - vocab_start
        owned = (local >= 0) & (local < logits.shape[-1]) & (labels != ignore_index)
        local = local.masked_fill(~owned, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)
        target = _all_reduce(target, group)
        exp = shifted.exp_()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)
        log_sum_exp = sum_exp.log()
        valid = labels != ignore_index
        loss = (log_sum_exp - target).masked_fill(~valid, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, owned, valid)
        return loss, log_sum_exp + row_max

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        softmax, local, owned, valid = ctx.saved_tensors
        grad_loss = grad_loss.masked_fill(~valid, 0.0)
        one_hot_rows = owned.to(softmax.dtype)
        grad = softmax * (grad_loss + grad_lse).unsqueeze(-1)
        grad.scatter_add_(-1, local.unsqueeze(-1), (-grad_loss * one_hot_rows).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int = 0,
    *,
    group: ProcessGroup | None = None,
    ignore_index: int = -100,
    with_log_z: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token cross entropy (0 where labels == ignore_index) and, if asked, the fp32 log-sum-exp of the
    full logits. Without TP this is torch's fused cross entropy, plus a log-sum-exp pass only for the z-loss."""
    if group is None or dist.get_world_size(group) == 1:
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        ce = F.cross_entropy(wide.flatten(0, -2), labels.flatten(), reduction="none", ignore_index=ignore_index)
        return ce.view(labels.shape), wide.logsumexp(-1) if with_log_z else None
    return _VocabParallelCrossEntropy.apply(logits, labels, vocab_start, group, ignore_index)
