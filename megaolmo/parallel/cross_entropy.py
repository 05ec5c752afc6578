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


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Cross entropy of `hidden @ weight.T` computed `chunk` tokens at a time: the logits of a chunk exist only
    while it is processed, in forward and again (recomputed) in backward.

    Forward keeps the inputs and each token's fp32 log-sum-exp; backward rebuilds a chunk's logits, turns
    them into the softmax with the saved log-sum-exp (no collective), and multiplies the logits' gradient
    into both inputs' gradients. One more head GEMM than the whole-logits path, for at most
    [chunk, V / tp] fp32 alive instead of several [tokens, V / tp].
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, group, ignore_index, chunk):
        rows, wide = weight.shape[0], torch.promote_types(hidden.dtype, torch.float32)  # at least fp32
        losses, log_sum_exps = [], []
        for h, target in zip(hidden.split(chunk), labels.split(chunk)):
            logits = F.linear(h, weight).to(wide)  # the head's output in its dtype, upcast as the loss does
            row_max = _all_reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
            local = target - vocab_start
            owned = (local >= 0) & (local < rows) & (target != ignore_index)
            picked = logits.gather(-1, local.masked_fill(~owned, 0).unsqueeze(-1)).squeeze(-1)
            picked = _all_reduce(picked.masked_fill(~owned, 0.0) - row_max.masked_fill(~owned, 0.0), group)
            sum_exp = _all_reduce((logits - row_max.unsqueeze(-1)).exp_().sum(dim=-1), group)
            log_sum_exp = sum_exp.log()
            losses.append((log_sum_exp - picked).masked_fill(target == ignore_index, 0.0))
            log_sum_exps.append(log_sum_exp + row_max)
        log_sum_exp = torch.cat(log_sum_exps)
        ctx.save_for_backward(hidden, weight, labels, log_sum_exp)
        ctx.vocab_start, ctx.ignore_index, ctx.chunk = vocab_start, ignore_index, chunk
        return torch.cat(losses), log_sum_exp

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, labels, log_sum_exp = ctx.saved_tensors
        rows, wide = weight.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden)
        # The weight's gradient sums over every chunk: in fp32, each chunk's GEMM rounded once as one GEMM is.
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device)
        chunk = ctx.chunk
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            h, target = hidden[part], labels[part]
            valid = target != ctx.ignore_index
            g_loss = grad_loss[part].masked_fill(~valid, 0.0)
            softmax = (F.linear(h, weight).to(wide) - log_sum_exp[part].unsqueeze(-1)).exp_()
            grad = softmax.mul_((g_loss + grad_lse[part]).unsqueeze(-1))
            local = target - ctx.vocab_start
            owned = (local >= 0) & (local < rows) & valid
            grad.scatter_add_(-1, local.masked_fill(~owned, 0).unsqueeze(-1), (-g_loss * owned).unsqueeze(-1))
            grad = grad.to(hidden.dtype)
            grad_hidden[part] = grad @ weight
            grad_weight += grad.t() @ h
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int = 0,
    *,
    group: ProcessGroup | None = None,
    ignore_index: int = -100,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross entropy (0 where labels == ignore_index) and fp32 log-sum-exp of the logits
    `hidden @ weight.T` over the whole (TP-split) vocabulary, never holding more than `chunk_tokens` tokens'
    logits. `hidden` [..., d] is the head's input on this rank, `weight` its [V / tp, d] slice."""
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    loss, log_sum_exp = _ChunkedLinearCrossEntropy.apply(
        flat_hidden, weight, flat_labels, vocab_start, group, ignore_index, chunk_tokens
    )
    return loss.view(labels.shape), log_sum_exp.view(labels.shape)
