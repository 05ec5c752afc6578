"""Tiny data fixtures for tests/test_data.py: Dolma files, tokenizers and decoding, all written in place.

Kept apart from the tests so other test files (training, evaluation) can build the same small data.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from megaolmo.data import train_bpe_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Unicode too: naïve café, 東京, emoji 🙂 and\ttabs.",
    "",
    "A document that mentions <|endoftext|> in its text.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
]


def training_text() -> list[str]:
    """Enough varied text for a 300-token BPE to find all its merges."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "data", "token", "model", "seed"]
    return [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 3 + TEXTS


def write_dolma(path: Path, docs: Iterable[dict]) -> Path:
    """Write `docs` as one JSON object a line, gzipped when the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def docs(texts: Iterable[str], source: str | None = None, prefix: str = "doc") -> list[dict]:
    """Dolma documents of `texts` (with `source` when given)."""
    out = []
    for i, text in enumerate(texts):
        doc = {"id": f"{prefix}-{i}", "text": text}
        if source is not None:
            doc["source"] = source
        out.append(doc)
    return out


def small_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE of `vocab_size` tokens trained on `training_text()`."""
    train_bpe_tokenizer(training_text(), vocab_size, path)
    return path


def big_vocab_tokenizer(path: Path, vocab_size: int = 70_000) -> Path:
    """A byte-level tokenizer with more than 65535 ids (filler tokens never produced): data must be uint32.

    Built directly instead of trained, because training that many merges needs megabytes of text.
    """
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    while len(vocab) < vocab_size - 1:
        vocab[f"<filler{len(vocab)}>"] = len(vocab)
    vocab["<|endoftext|>"] = vocab_size - 1  # the last id, as in OLMo's tokenizer (50279): eos_id must look it up
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path))
    return path


def decode_documents(tokens: np.ndarray, tokenizer: Tokenizer, eos: int) -> list[str]:
    """Split a token stream at EOS and decode each document (the stream must end with EOS)."""
    assert tokens.size == 0 or tokens[-1] == eos, "every document ends with EOS"
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, ends)]
