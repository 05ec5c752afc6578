"""Context parallelism's pieces: the zig-zag split, the balance and skipping of the ring's pairs, and ring
attention against attention over the whole sequence (fp64, GQA, windows, documents) on 2 and 4 gloo ranks.
The training layouts under CP are in the parity matrix (test_parallel)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from context_worker import Case, run_cases
from gloo_groups import spawn

from megaolmo.parallel.context import (
    BlockPair,
    ContextParallel,
    SequenceShard,
    _allowed,
    _bias,
    _block_backward,
    _block_forward,
    _pairs,
    chunks_of,
    zigzag_index,
    zigzag_split,
)

CASES = [
    Case(f"cp{cp}{'_window' * bool(window)}{'_docs' * documents}", cp, window, documents)
    for cp in (2, 4)
    for window in (None, 7)
    for documents in (False, True)
]


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_chunks_cover_the_sequence_once_in_ascending_order(cp: int) -> None:
    seq_len = 8 * cp
    indices = [zigzag_index(seq_len, cp, rank) for rank in range(cp)]
    assert torch.equal(torch.cat(indices).sort().values, torch.arange(seq_len))
    tokens = torch.arange(3 * seq_len).view(3, seq_len)
    for rank, index in enumerate(indices):
        assert bool((index.diff() > 0).all())
        assert chunks_of(rank, cp) == (rank, 2 * cp - 1 - rank)
        assert torch.equal(zigzag_split(tokens, cp, rank), tokens[:, index])


def _computed(shard: SequenceShard, window: int | None) -> tuple[int, int]:
    """(query-key pairs attended, kernel calls) of a rank over the whole ring, and checks no skipped pair
    attends anything."""
    attended = calls = 0
    cp = shard.cp.size
    for source in range(cp):
        computed = {(pair.q, pair.k): pair for pair in _pairs(shard, source, window)}
        for q in (0, 1):
            for k in (0, 1):
                diagonal = chunks_of(shard.cp.rank, cp)[q] == chunks_of(source, cp)[k]
                pair = computed.get((q, k), BlockPair(q, k, diagonal=diagonal, masked=True))
                allowed = int(_allowed(shard, pair, source, window).sum())
                if (q, k) in computed:
                    attended, calls = attended + allowed, calls + 1
                else:
                    assert allowed == 0, ("skipped a pair that attends", shard.cp.rank, source, q, k)
    return attended, calls


@pytest.mark.parametrize("window", [None, 5])
def test_every_rank_attends_as_many_pairs_and_skips_only_masked_ones(window: int | None) -> None:
    """The zig-zag balance: under causal attention every rank attends the same number of (query, key) pairs,
    and the pairs the ring skips (causality, the window) attend nothing."""
    cp, seq_len = 4, 64
    counts = []
    for rank in range(cp):
        shard = SequenceShard(ContextParallel(group=None, size=cp, rank=rank), seq_len // cp, torch.device("cpu"))
        counts.append(_computed(shard, window))
    attended = [count for count, _ in counts]
    if window is None:
        assert len(set(attended)) == 1 and sum(attended) == seq_len * (seq_len + 1) // 2
        assert len({calls for _, calls in counts}) == 1
    else:
        assert sum(attended) == sum(min(i + 1, window) for i in range(seq_len))
        assert max(calls for _, calls in counts) < 2 * cp  # most of the ring's 4 x cp pairs are out of the window


@pytest.fixture(scope="module")
def ring_errors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ring")
    spawn(run_cases, ([dataclasses.asdict(case) for case in CASES], str(out)), 4)
    return out


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_ring_attention_equals_attention_over_the_whole_sequence(case: Case, ring_errors: Path) -> None:
    directory = ring_errors / case.name
    errors = sorted(directory.glob("*.error"))
    assert not errors, errors[0].read_text()
    for rank in range(case.cp):
        found = json.loads((directory / f"rank{rank}.json").read_text())
        assert max(found.values()) < 1e-12, (rank, found)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "masked"])
def test_block_kernels_return_the_log_sum_exp_and_take_it_back(device: str, dtype: torch.dtype, masked: bool) -> None:
    """The ring's kernels (CPU's flash kernel; CUDA's memory-efficient one, which takes an additive mask and
    returns the log-sum-exp) on one pair of 40-token chunks (not a multiple of the CUDA kernel's 16 or 32)
    with GQA: the output and log-sum-exp, and the gradients given them back, against the math."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad = (
        torch.randn(2, heads, 40, 64, generator=generator, device=device, dtype=dtype) for heads in (8, 2, 2, 8)
    )
    allowed = torch.ones(40, 40, dtype=torch.bool, device=device).tril()[None, None].expand(2, 1, 40, 40).clone()
    if masked:
        allowed[0, :, :, 20:] = False  # another document: row 0's later queries see only their own keys
        allowed[1, :, 5] = False  # a query that sees no key of this pair
    bias = _bias(allowed, dtype) if masked else None
    out, lse = _block_forward(q, k, v, not masked, bias)
    reference = [t.float().requires_grad_() for t in (q, k, v)]
    scores = reference[0] @ reference[1].repeat_interleave(4, 1).transpose(-1, -2) / 8.0
    scores = scores.masked_fill(~allowed, float("-inf"))
    expected_lse = scores.logsumexp(-1)
    probabilities = (scores - expected_lse[..., None]).exp().nan_to_num()
    expected = probabilities @ reference[2].repeat_interleave(4, 1)
    expected.backward(grad.float())
    visible = allowed.any(-1).expand(2, 8, 40)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert (out.float() - expected).abs()[visible].max() < tolerance
    assert (lse.float() - expected_lse).abs()[visible].max() < tolerance
    merged_lse = torch.where(visible, lse.float(), 0.0).to(lse.dtype)  # the ring's is finite for every query
    grads = _block_backward(grad, q, k, v, out, merged_lse.contiguous(), not masked, bias)
    for got, want in zip(grads, reference):
        assert got.shape == want.shape
        assert (got.float() - want.grad).abs().max() < tolerance * max(1.0, want.grad.abs().max().item())
