"""Paloma perplexity: loss, perplexity and bits per byte per domain, per source and overall, of Dolma documents.

Each document is scored on its own, under one of two conventions:

    paloma        Paloma's released evaluation (OLMo-Eval -> catwalk -> lm-eval-harness rolling
                  log-likelihood): the text's tokens with EOS prepended as context, every text token
                  predicted, no EOS after the text. A text longer than `max_length` is cut into windows
                  of `max_length` model inputs: the first predicts the first `max_length` tokens, each
                  later one the next `stride` tokens from the `max_length` tokens before them. Paloma
                  uses stride = max_length, so windows predict disjoint blocks and a block's first
                  token sees one token of context (lm-eval's `context_len=1`); the last window still
                  reads `max_length` tokens. A smaller stride gives each token at least
                  `max_length - stride + 1` tokens of context, at more forward passes.
    olmo-in-loop  OLMo's in-loop evaluator on the document as its evaluation data holds it,
                  `tokens + [EOS]`, cut into disjoint chunks of `max_length` tokens; within a chunk every
                  token but the first is predicted (labels shifted by one), so the document's first token
                  and each chunk's first token are context only, and the closing EOS is predicted.

Groups come from `megaolmo.data.groups`: a domain is `source/subdomain` (Paloma's records), or
`source/domain`, or the source alone when a document names no domain. Per domain, per source (all its
documents) and overall: loss = NLL (nats) per predicted token, perplexity = exp(loss), bits per byte =
NLL / ln 2 / UTF-8 bytes of the texts. Per source and overall there is also the average over domains
(each domain counts once, whatever its size): Paloma's headline "average over domains" is the mean of the
domains' perplexities, so `domain_average.perplexity` is that mean, not exp of the mean loss.

Without a `scorer`, under torchrun each rank scores every `world`-th document and the per-document
numbers are gathered and added in document order, so totals do not depend on the number of ranks. With
one (a model sharded over TP x PP x DP that splits the rows itself) every rank scores every document
through it and nothing is gathered.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import torch
from tqdm import tqdm

from megaolmo.data.groups import document_domain, document_source, group_name
from megaolmo.data.tokenizer import eos_id
from megaolmo.errors import EvalError
from megaolmo.eval.runtime import gather, rank_and_world
from megaolmo.eval.scoring import Model, Row, Scorer, score_rows

CHUNK_DOCUMENTS = 512  # documents tokenized and scored together: bounds memory on any corpus size
PALOMA = "paloma"
OLMO_IN_LOOP = "olmo-in-loop"
CONVENTIONS = (PALOMA, OLMO_IN_LOOP)


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int]]:
    """(begin, n_scored) per window over a sequence of `n_tokens` whose tokens 1.. are predicted.

    A window's row is `tokens[begin : begin + max_length + 1]` (at most `max_length` model inputs) and
    scores its last `n_scored` tokens: the first window the first `max_length`, each later one the next
    `stride` (fewer at the end), from the `max_length` tokens before them. Together they score tokens
    1..n_tokens-1 exactly once. This is lm-eval's `get_rolling_token_windows` with
    `context_len = max_length - stride + 1`; Paloma's stride = max_length is its `context_len=1`.
    """
    if not 1 <= stride <= max_length:
        raise EvalError(f"stride {stride} must be between 1 and max_length {max_length}")
    windows = []
    next_scored = 1
    while next_scored < n_tokens:
        block = max_length if next_scored == 1 else stride
        end = min(next_scored - 1 + block, n_tokens - 1)  # the last token this window predicts
        windows.append((max(0, end - max_length), end + 1 - next_scored))
        next_scored = end + 1
    return windows


def chunk_windows(n_tokens: int, max_length: int) -> list[tuple[int, int]]:
    """(begin, stop) per chunk of OLMo's in-loop evaluation: disjoint `max_length`-token chunks of the
    sequence; a chunk's row is `tokens[begin:stop]` and predicts all of it but its first token. A last
    chunk of one token predicts nothing and is left out."""
    return [(begin, min(begin + max_length, n_tokens)) for begin in range(0, n_tokens - 1, max_length)]


def document_rows(ids: list[int], eos: int, *, convention: str, max_length: int, stride: int) -> list[Row]:
    """The rows that score one document's token `ids` under `convention` (olmo-in-loop's stride is max_length)."""
    if convention == PALOMA:
        tokens = [eos, *ids]
        return [
            Row(tuple(tokens[begin : begin + max_length + 1]), n_scored)
            for begin, n_scored in sliding_windows(len(tokens), max_length, stride)
        ]
    tokens = [*ids, eos]
    return [Row(tuple(tokens[begin:stop]), stop - begin - 1) for begin, stop in chunk_windows(len(tokens), max_length)]


@contextmanager
def special_tokens_as_text(tokenizer: Any) -> Iterator[None]:
    """Encode `<|endoftext|>` inside a text as plain text, as `megaolmo.data.prepare` does for training."""
    before = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        yield
    finally:
        tokenizer.encode_special_tokens = before


def utf8_bytes(doc: dict) -> int:
    try:
        return len(doc["text"].encode("utf-8"))
    except UnicodeEncodeError:
        raise EvalError(f"document {doc.get('id')!r} has text that is not valid Unicode (a lone surrogate)") from None


@dataclass
class Totals:
    """Sums over documents; `summary()` turns them into the reported metrics."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    nll: float = 0.0

    def add(self, tokens: int, n_bytes: int, nll: float) -> None:
        self.documents += 1
        self.tokens += tokens
        self.bytes += n_bytes
        self.nll += nll

    def summary(self) -> dict[str, Any]:
        loss = self.nll / self.tokens if self.tokens else float("nan")
        return {
            **asdict(self),
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)) if self.tokens else float("nan"),
            "bits_per_byte": self.nll / math.log(2) / self.bytes if self.bytes else None,
        }


def domain_average(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The number of domains and unweighted means over them (Paloma's "average over domains") of their
    perplexities, losses and bits per byte; a domain with no predicted token (or byte) is left out of a mean."""
    scored = [s for s in summaries if s["tokens"]]
    with_bytes = [s["bits_per_byte"] for s in scored if s["bits_per_byte"] is not None]

    def mean(values: list[float]) -> float:
        return math.fsum(values) / len(values) if values else float("nan")

    return {
        "domains": len(summaries),
        "perplexity": mean([s["perplexity"] for s in scored]),
        "loss": mean([s["loss"] for s in scored]),
        "bits_per_byte": mean(with_bytes) if with_bytes else None,
    }


def _score_chunk(
    model: Model,
    tokenizer: Any,
    docs: list[dict],
    *,
    windows: dict[str, Any],
    scorer: Scorer | None,
    device: torch.device | str,
    batch_size: int,
) -> list[tuple[int, float]]:
    """(predicted tokens, nll) per document of one chunk; `windows` are document_rows' keyword arguments."""
    eos = eos_id(tokenizer)
    with special_tokens_as_text(tokenizer):
        encodings = tokenizer.encode_batch([doc["text"] for doc in docs], add_special_tokens=False)
    rows: list[Row] = []
    owners: list[int] = []
    for d, encoding in enumerate(encodings):
        doc_rows = document_rows(encoding.ids, eos, **windows)
        rows.extend(doc_rows)
        owners.extend([d] * len(doc_rows))
    if scorer is not None:
        logprobs = scorer(rows)
    else:
        logprobs = score_rows(model, rows, pad_id=eos, device=device, batch_size=batch_size)
    nll = [0.0] * len(docs)
    predicted = [0] * len(docs)
    for owner, row, logprob in zip(owners, rows, logprobs):
        nll[owner] -= logprob
        predicted[owner] += row.n_scored
    return list(zip(predicted, nll))


def score_documents(
    model: Model,
    tokenizer: Any,
    documents: Iterable[dict],
    *,
    convention: str = PALOMA,
    max_length: int | None = None,
    stride: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: bool = False,
    per_document: bool = False,
    scorer: Scorer | None = None,
) -> dict[str, Any]:
    """Score Dolma or Paloma documents (dicts with "text", "source", optional subdomain) per domain and source.

    `model(ids) -> logits` in eval mode on `device`; `tokenizer` a `tokenizers.Tokenizer` with an EOS.
    `convention` is "paloma" or "olmo-in-loop" (module docstring); `max_length` defaults to the model's
    `config.max_sequence_length`; `stride` (paloma only) to `max_length`, Paloma's disjoint windows. With a
    `scorer` every rank scores every document through it (`device` and `batch_size` are then unused).
    Returns {"convention", "max_length", "stride", "groups": {domain: summary}, "sources": {source: summary
    + "domain_average"}, "domain_average", "overall": summary} plus "documents" (id, source,
    domain, group, tokens, bytes, nll per document) when `per_document`; a summary holds documents,
    tokens, bytes, nll (nats), loss, perplexity and bits_per_byte.
    """
    max_length, stride = check_window(model, convention, max_length, stride)
    rank, world = rank_and_world()
    share_rank, share_world = (0, 1) if scorer is not None else (rank, world)  # a scorer splits rows itself
    windows = {"convention": convention, "max_length": max_length, "stride": stride}
    scoring = {"scorer": scorer, "device": device, "batch_size": batch_size}
    mine: list[tuple[int, dict]] = []
    bar = tqdm(desc="perplexity", unit="doc", disable=not progress or rank != 0, dynamic_ncols=True)
    documents = iter(documents)
    index = 0
    while chunk := list(islice(documents, CHUNK_DOCUMENTS * share_world)):
        n_bytes = [utf8_bytes(doc) for doc in chunk]  # on every rank, so a bad text stops them all alike
        share = [i for i in range(len(chunk)) if (index + i) % share_world == share_rank]
        if share:
            docs = [chunk[i] for i in share]
            scores = _score_chunk(model, tokenizer, docs, windows=windows, **scoring)
            for i, doc, (tokens, nll) in zip(share, docs, scores):
                record = {"id": doc.get("id"), "source": document_source(doc), "domain": document_domain(doc)}
                record.update(group=group_name(doc), tokens=tokens, bytes=n_bytes[i], nll=nll)
                mine.append((index + i, record))
        index += len(chunk)
        bar.update(len(chunk))
    bar.close()
    records = [record for _, record in mine] if scorer is not None else gather(mine)
    return summarize(records, convention=convention, max_length=max_length, stride=stride, per_document=per_document)


def check_window(model: Model, convention: str, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """The window and stride to use; a bad convention, or a window longer than the model's context, is
    refused up front. Under olmo-in-loop the stride is max_length: its chunks are disjoint, by definition."""
    if convention not in CONVENTIONS:
        raise EvalError(f"convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
    config = getattr(model, "config", None)
    limit = getattr(config, "max_sequence_length", None)
    if max_length is None:
        if limit is None:
            raise EvalError("max_length is needed: the model has no config.max_sequence_length")
        max_length = limit
    if max_length < 1 or (limit is not None and max_length > limit):
        raise EvalError(f"max_length {max_length} must be between 1 and the model's max_sequence_length {limit}")
    if convention == OLMO_IN_LOOP:
        if stride is not None:
            raise EvalError("stride applies to the paloma convention only; olmo-in-loop's chunks are disjoint")
        if max_length < 2:
            raise EvalError("max_length must be at least 2 under olmo-in-loop: a chunk's first token is context")
        return max_length, max_length
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise EvalError(f"stride {stride} must be between 1 and max_length {max_length}")
    return max_length, stride


def summarize(
    records: list[dict], *, convention: str, max_length: int, stride: int, per_document: bool
) -> dict[str, Any]:
    """Per-domain, per-source and overall summaries of per-document records, added in document order."""
    groups: dict[str, Totals] = {}
    sources: dict[str, Totals] = {}
    source_groups: dict[str, set[str]] = {}
    overall = Totals()
    for record in records:
        numbers = (record["tokens"], record["bytes"], record["nll"])
        groups.setdefault(record["group"], Totals()).add(*numbers)
        sources.setdefault(record["source"], Totals()).add(*numbers)
        source_groups.setdefault(record["source"], set()).add(record["group"])
        overall.add(*numbers)
    group_summaries = {name: groups[name].summary() for name in sorted(groups)}
    source_summaries = {}
    for name in sorted(sources):
        members = [group_summaries[group] for group in sorted(source_groups[name])]
        source_summaries[name] = {**sources[name].summary(), "domain_average": domain_average(members)}
    result: dict[str, Any] = {
        "convention": convention,
        "max_length": max_length,
        "stride": stride,
        "groups": group_summaries,
        "sources": source_summaries,
        "domain_average": domain_average(list(group_summaries.values())),
        "overall": overall.summary(),
    }
    if per_document:
        result["documents"] = records
    return result
