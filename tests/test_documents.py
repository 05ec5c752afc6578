"""Intra-document attention: OLMo's document boundaries, and a packed instance computed as its documents alone.

A row of EOS-separated documents with document masking gives every token the loss (and the model the
gradient) it has when its document runs as a sequence of its own: attention stays in the document and RoPE
counts from its start. OLMo-1 and OLMo-3 (GQA, QK-norm, sliding windows, YaRN on the full layer), fp32, with
the torch references and the Triton kernels (Triton's interpreter on CPU). The parallel layouts are checked
against one process in test_parallel.py (the `docs_` layouts).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import small_model

from megaolmo import build_model
from megaolmo.config import ParallelConfig
from megaolmo.data.documents import document_lengths, document_positions
from megaolmo.data.labels import shifted_labels
from megaolmo.kernels import fused, reference
from megaolmo.model.engine import ParallelOLMo
from megaolmo.model.olmo import Documents, causal_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EOS = 0
SEQ = 16
CONFIGS = {
    "olmo1": small_model(n_kv_heads=2, max_sequence_length=SEQ, kernels="torch"),
    "olmo3_window4": small_model(
        arch="olmo3", n_kv_heads=2, max_sequence_length=SEQ, layer_norm_eps=1e-6, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], rope_theta=500000.0, rope_scaling="yarn",
        rope_scaling_factor=2.0, rope_original_max_position=8, weight_tying=False, kernels="torch",
    ),
}  # fmt: skip


def olmo_document_lengths(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """allenai/OLMo's `get_document_lengths` (olmo/data/util.py), one instance at a time: the oracle."""
    doc_boundaries = torch.cat(
        [
            torch.tensor([-1], dtype=torch.int32),
            (input_ids == eos_token_id).nonzero(as_tuple=True)[0].to(dtype=torch.int32),
            torch.tensor([] if input_ids[-1] == eos_token_id else [input_ids.shape[0] - 1], dtype=torch.int32),
        ]
    )
    return doc_boundaries[1:] - doc_boundaries[:-1]


def packed(eos_positions: list[list[int]], seed: int = 0) -> torch.Tensor:
    """[len(eos_positions), SEQ] random ids (never EOS) with EOS exactly at each row's positions."""
    ids = torch.randint(1, 256, (len(eos_positions), SEQ), generator=torch.Generator().manual_seed(seed))
    for row, positions in enumerate(eos_positions):
        ids[row, positions] = EOS
    return ids


ROWS = {
    "eos_at_the_end": [3, 9, 15],
    "no_eos": [],
    "consecutive_eos": [4, 5, 6, 11],
    "eos_first": [0, 7],
    "only_eos": list(range(SEQ)),
}


@pytest.mark.parametrize("positions", ROWS.values(), ids=ROWS.keys())
def test_document_lengths_are_olmos(positions: list[int]) -> None:
    ids = packed([positions])
    assert torch.equal(document_lengths(ids, EOS)[0], olmo_document_lengths(ids[0], EOS))


def test_a_batch_gives_each_row_its_lengths_padded_with_zeros() -> None:
    """A batch of rows with 1 to 16 documents (and random rows): OLMo's lengths per row, zero-padded like its
    collator's `doc_lens`; every row's positions count 0, 1, ... from each document's first token."""
    ids = torch.cat(
        [packed(list(ROWS.values())), torch.randint(0, 4, (6, SEQ), generator=torch.Generator().manual_seed(1))]
    )
    lengths = document_lengths(ids, EOS)
    assert lengths.dtype == torch.int32
    olmo = [olmo_document_lengths(row, EOS) for row in ids]
    assert lengths.shape == (len(ids), max(len(row) for row in olmo))
    for got, want in zip(lengths, olmo):
        assert torch.equal(got, F.pad(want, (0, lengths.shape[1] - len(want))))
    positions = document_positions(lengths, SEQ)
    for row, want in zip(positions, olmo):
        assert torch.equal(row, torch.cat([torch.arange(n) for n in want.tolist()]))


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)


def alone(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Every row's per-token losses with each of its documents run by itself (the same targets): one document
    a row, from position 0, padded on the right (which causal attention keeps it from seeing), no masking."""
    spans = []  # (row, start, length) of every document, in token order
    for row, lengths in enumerate(document_lengths(ids, EOS).tolist()):
        starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
        spans += [(row, start, n) for start, n in zip(starts, lengths) if n]
    width = max(n for _, _, n in spans)
    docs = torch.ones(len(spans), width, dtype=ids.dtype, device=ids.device)
    targets = torch.zeros(len(spans), width, dtype=labels.dtype, device=labels.device)
    for i, (row, start, n) in enumerate(spans):
        docs[i, :n], targets[i, :n] = ids[row, start : start + n], labels[row, start : start + n]
    losses = per_token_losses(model(docs), targets)
    return torch.cat([losses[i, :n] for i, (_, _, n) in enumerate(spans)]).view(labels.shape)


@pytest.mark.parametrize("rope", ["torch", "triton"])
@pytest.mark.parametrize("name", CONFIGS)
def test_a_packed_instance_computes_as_its_documents_alone(
    name: str, rope: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-token losses and the gradients of their sum, packed with document masking against each document
    run alone: equal to fp32 rounding (not bitwise: GEMMs and attention block differently on other shapes).
    Documents of 1 to 9 tokens, around OLMo-3's window of 4. RoPE by the torch reference or by the Triton
    kernel (per-token tables packed, the shared table alone); the other ops' kernels change nothing here and
    are tested in test_kernels.py (under Triton's interpreter they would take most of a minute)."""
    if rope == "triton":
        monkeypatch.setattr(reference, "apply_rope", fused.apply_rope)
    torch.manual_seed(0)
    model = build_model(CONFIGS[name], device=DEVICE)
    ids = packed([ROWS["eos_at_the_end"], [0, 5, 6]]).to(DEVICE)  # lengths [4, 6, 6] and [1, 5, 1, 9]
    labels = shifted_labels(ids)
    labels[:, -1] = 0  # a target for every position, so every logit is compared
    positions = document_positions(document_lengths(ids, EOS), SEQ)
    ours = per_token_losses(model(ids, doc_positions=positions), labels)
    ours.sum().backward()
    ours_grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    theirs = alone(model, ids, labels)
    theirs.sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for param_name, param in model.named_parameters():
        scale = param.grad.abs().max().clamp(min=1e-12)
        assert ((ours_grads[param_name] - param.grad).abs().max() / scale).item() < 1e-5, param_name


def test_the_engine_masks_documents_in_training_and_evaluation() -> None:
    """ParallelOLMo(document_masking=True) finds the documents in the ids itself: the step's loss, the rows'
    summed losses and the held-out evaluation are those of the documents alone."""
    config = CONFIGS["olmo3_window4"]
    engine = ParallelOLMo(config, ParallelConfig(device="cpu"), seed=3, document_masking=True)
    ids = packed([ROWS["eos_at_the_end"], ROWS["eos_first"], ROWS["consecutive_eos"], ROWS["no_eos"]], seed=2)
    labels = shifted_labels(ids)
    with torch.no_grad():
        expected = alone(engine.stages[0], ids, labels.clamp(min=0)) * (labels >= 0)
    torch.testing.assert_close(engine.row_losses(ids, labels, micro_batch_size=2), expected.sum(1))
    nll, tokens = engine.evaluate(ids, labels, micro_batch_size=4)
    assert tokens == (labels >= 0).sum() and nll == pytest.approx(expected.sum().item(), rel=1e-6)
    losses = engine.forward_backward(ids, labels, micro_batch_size=1)
    assert losses.ce == pytest.approx(expected.sum().item() / tokens, rel=1e-6)
    engine.document_masking = False
    unmasked = engine.row_losses(ids, labels, micro_batch_size=2)
    assert (unmasked - expected.sum(1)).abs()[:3].min() > 1e-2, "rows of several documents: masking tells"
    torch.testing.assert_close(unmasked[3], expected.sum(1)[3])  # a row of one document: the same either way


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
def test_flash_varlen_matches_sdpa_with_the_document_mask(window: int | None) -> None:
    """flash-attn's variable-length kernel on the flattened documents against SDPA's [b, 1, s, s] mask, GQA,
    forward and backward in bf16; and a whole OLMo-3 model either way."""
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    seq, batch, heads, kv_heads, head_dim = 64, 3, 8, 2, 64
    ids = torch.randint(1, 256, (batch, seq))
    ids[0, [9, 10, 40, 63]] = EOS
    ids[1, [0, 30]] = EOS  # the third row is one document
    positions = document_positions(document_lengths(ids, EOS), seq).cuda()
    qkv = [
        torch.randn(seq, batch, n, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for n in (heads, kv_heads, kv_heads)
    ]
    grad = torch.randn(seq, batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    results = []
    for backend in ("sdpa", "flash"):
        out = causal_attention(*qkv, backend, window, Documents(positions))
        results.append((out, *torch.autograd.grad(out, qkv, grad)))
    for expected, got in zip(*results):
        assert ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item() < 2e-2

    config = dataclasses.replace(CONFIGS["olmo3_window4"], max_sequence_length=seq, sliding_window=window or seq)
    sdpa = build_model(config, device="cuda").to(torch.bfloat16).eval()
    flash = build_model(dataclasses.replace(config, attention="flash"), device="cuda").to(torch.bfloat16).eval()
    flash.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        expected = sdpa(ids.cuda(), doc_positions=positions).float()
        got = flash(ids.cuda(), doc_positions=positions).float()
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 2e-2
