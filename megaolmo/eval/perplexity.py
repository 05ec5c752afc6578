"""Paloma-style perplexity: loss, perplexity and bits per byte per source (and domain) of Dolma documents.

Each document is scored on its own, the way training sees it: `[EOS] + tokens(text) + [EOS]`. The
leading EOS stands for the end of the previous document in a training stream and is context only, so
every text token and the closing EOS is predicted (lm-eval-harness's rolling log-likelihood prefixes
its end-of-text token the same way). A document longer than the context is scored with a sliding
window of `max_length` input tokens moved `stride` tokens at a time; each window scores only the
tokens no earlier window scored, so every token is predicted exactly once, with at least
`max_length - stride + 1` tokens of left context once the document is that long (Hugging Face's
"perplexity of fixed-length models" scheme).

Per group and overall: loss = NLL (nats) per predicted token, perplexity = exp(loss), and
bits per byte = NLL / ln 2 / UTF-8 bytes of the texts (EOS predictions count in the NLL, as in the
training loop's held-out bits per byte). Under torchrun each rank scores every `world`-th document and
the per-document numbers are gathered and added in document order, so totals do not depend on the
number of ranks.
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

from megaolmo.data.tokenizer import eos_id
from megaolmo.errors import EvalError
from megaolmo.eval.runtime import gather, rank_and_world
from megaolmo.eval.scoring import Model, Row, score_rows

CHUNK_DOCUMENTS = 512  # documents tokenized and scored together: bounds memory on any corpus size


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int]]:
    """(begin, n_scored) per window over a sequence of `n_tokens` whose tokens 1.. are predicted.

    A window's row is `tokens[begin : begin + max_length + 1]` (at most `max_length` model inputs) and
    scores its last `n_scored` tokens; together the windows score tokens 1..n_tokens-1 exactly once.
    """
    if not 1 <= stride <= max_length:
        raise EvalError(f"stride {stride} must be between 1 and max_length {max_length}")
    windows = []
    begin, next_scored = 0, 1
    while next_scored < n_tokens:
        end = min(begin + max_length, n_tokens - 1)  # the last token this window predicts
        windows.append((begin, end + 1 - next_scored))
        next_scored = end + 1
        begin += stride
    return windows


def document_rows(tokens: list[int], max_length: int, stride: int) -> list[Row]:
    """The rows that score all of `tokens` but the first, `max_length` inputs at a time."""
    rows = []
    for begin, n_scored in sliding_windows(len(tokens), max_length, stride):
        rows.append(Row(tuple(tokens[begin : begin + max_length + 1]), n_scored))
    return rows


def group_name(doc: dict) -> str:
    """`source`, or `source/domain` when the document names a domain (metadata.domain, else domain)."""
    metadata = doc.get("metadata")
    domain = metadata.get("domain") if isinstance(metadata, dict) else None
    domain = domain if domain is not None else doc.get("domain")
    source = str(doc.get("source", "unknown"))
    return source if domain is None else f"{source}/{domain}"


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


def _score_chunk(model: Model, tokenizer: Any, docs: list[dict], *, max_length: int, stride: int, **kwargs) -> list:
    """(predicted tokens, nll) per document of one chunk."""
    eos = eos_id(tokenizer)
    with special_tokens_as_text(tokenizer):
        encodings = tokenizer.encode_batch([doc["text"] for doc in docs], add_special_tokens=False)
    rows: list[Row] = []
    owners: list[int] = []
    for d, encoding in enumerate(encodings):
        doc_rows = document_rows([eos, *encoding.ids, eos], max_length, stride)
        rows.extend(doc_rows)
        owners.extend([d] * len(doc_rows))
    nll = [0.0] * len(docs)
    for owner, logprob in zip(owners, score_rows(model, rows, pad_id=eos, **kwargs)):
        nll[owner] -= logprob
    return [(len(encoding.ids) + 1, nll[d]) for d, encoding in enumerate(encodings)]


def score_documents(
    model: Model,
    tokenizer: Any,
    documents: Iterable[dict],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: bool = False,
    per_document: bool = False,
) -> dict[str, Any]:
    """Score Dolma documents (dicts with "text", "source", optional domain) and summarize per group.

    `model(ids) -> logits` in eval mode on `device`; `tokenizer` a `tokenizers.Tokenizer` with an EOS.
    `max_length` defaults to the model's `config.max_sequence_length`, `stride` to half of it. Returns
    {"max_length", "stride", "groups": {name: summary}, "overall": summary} plus "documents" (id, group,
    tokens, bytes, nll per document) when `per_document`; a summary holds documents, tokens, bytes,
    nll (nats), loss, perplexity and bits_per_byte.
    """
    max_length, stride = check_window(model, max_length, stride)
    rank, world = rank_and_world()
    mine: list[tuple[int, dict]] = []
    bar = tqdm(desc="perplexity", unit="doc", disable=not progress or rank != 0, dynamic_ncols=True)
    documents = iter(documents)
    index = 0
    while chunk := list(islice(documents, CHUNK_DOCUMENTS * world)):
        n_bytes = [utf8_bytes(doc) for doc in chunk]  # on every rank, so a bad text stops them all alike
        share = [i for i in range(len(chunk)) if (index + i) % world == rank]
        if share:
            docs = [chunk[i] for i in share]
            scores = _score_chunk(
                model, tokenizer, docs, max_length=max_length, stride=stride, device=device, batch_size=batch_size
            )
            for i, doc, (tokens, nll) in zip(share, docs, scores):
                record = {"id": doc.get("id"), "group": group_name(doc), "tokens": tokens, "bytes": n_bytes[i]}
                mine.append((index + i, {**record, "nll": nll}))
        index += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return summarize(gather(mine), max_length, stride, per_document)


def check_window(model: Model, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """The window and stride to use; a window longer than the model's context is refused up front."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_sequence_length", None)
    if max_length is None:
        if limit is None:
            raise EvalError("max_length is needed: the model has no config.max_sequence_length")
        max_length = limit
    if max_length < 1 or (limit is not None and max_length > limit):
        raise EvalError(f"max_length {max_length} must be between 1 and the model's max_sequence_length {limit}")
    stride = max(1, max_length // 2) if stride is None else stride
    if not 1 <= stride <= max_length:
        raise EvalError(f"stride {stride} must be between 1 and max_length {max_length}")
    return max_length, stride


def summarize(records: list[dict], max_length: int, stride: int, per_document: bool) -> dict[str, Any]:
    """Per-group and overall summaries of per-document records, added in document order."""
    groups: dict[str, Totals] = {}
    overall = Totals()
    for record in records:
        groups.setdefault(record["group"], Totals()).add(record["tokens"], record["bytes"], record["nll"])
        overall.add(record["tokens"], record["bytes"], record["nll"])
    result: dict[str, Any] = {
        "max_length": max_length,
        "stride": stride,
        "groups": {name: groups[name].summary() for name in sorted(groups)},
        "overall": overall.summary(),
    }
    if per_document:
        result["documents"] = records
    return result
