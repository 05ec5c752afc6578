"""The loss without whole logits: the head's GEMM and cross entropy a chunk of tokens at a time
(trainer.loss_chunk_tokens) give the whole-logits numbers and gradients, and a step's memory shrinks by
the logits it no longer holds. (On TP x PP x DP layouts against one process: test_parallel's chunked_loss_*.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import small_model
from plan_worker import peak_live_bytes
from torch.profiler import ProfilerActivity, profile

from megaolmo.config import ParallelConfig
from megaolmo.model.engine import ParallelOLMo
from megaolmo.parallel.cross_entropy import chunked_linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 4, 21, 1000], ids=lambda chunk: f"chunk{chunk}")
def test_chunked_cross_entropy_equals_the_whole_logits(chunk: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = labels[2, 6] = -100
    grad_ce, grad_lse = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)

    ce, lse = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    (ce * grad_ce + lse * grad_lse).sum().backward()
    got = (ce.detach(), lse.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None

    logits = hidden @ weight.t()
    want_ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(3, 7)
    want_lse = logits.logsumexp(-1)
    (want_ce * grad_ce + want_lse * grad_lse).sum().backward()
    for mine, theirs in zip(got, (want_ce, want_lse, hidden.grad, weight.grad), strict=True):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-12, atol=1e-12)
    assert (got[0][labels == -100] == 0).all()


def step_peak_bytes(model: ParallelOLMo, ids: torch.Tensor, labels: torch.Tensor) -> int:
    """The most bytes that tensors allocated during one forward and backward hold at once (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model.forward_backward(ids, labels, micro_batch_size=ids.shape[0])
    return peak_live_bytes(prof)


def test_chunked_loss_matches_and_holds_far_fewer_bytes_than_the_whole_logits() -> None:
    """One process, a vocabulary much wider than the model (as OLMo-2's 100k against d_model): the same losses
    and gradients, and a step peak smaller by about the fp32 logits, softmax and gradient no longer held."""
    config = small_model(vocab_size=8192, max_sequence_length=128, kernels="torch")
    ids = torch.randint(0, 8192, (4, 128), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, dims=1)
    results = {}
    for chunk in (None, 64):
        model = ParallelOLMo(config, ParallelConfig(device="cpu"), seed=3, z_loss_multiplier=1e-4,
                             loss_chunk_tokens=chunk)  # fmt: skip
        losses = model.forward_backward(ids, labels, micro_batch_size=4)
        grads = {name: param.grad.clone() for name, param in model.named_parameters()}
        for param in model.parameters():
            param.grad = None
        results[chunk] = (losses, grads, step_peak_bytes(model, ids, labels))
    (whole, whole_grads, whole_peak), (chunked, chunked_grads, chunked_peak) = results[None], results[64]
    assert chunked.ce == pytest.approx(whole.ce, rel=1e-6) and chunked.z == pytest.approx(whole.z, rel=1e-5)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7)
    logits_fp32 = 4 * 128 * 8192 * 4  # [tokens, vocab] in fp32: 16 MiB here
    assert chunked_peak < whole_peak - 1.5 * logits_fp32, (chunked_peak, whole_peak)
