"""The UTF-8 bytes of text each vocabulary id stands for: what bits per byte divides by.

Bits per byte is NLL / ln 2 / the UTF-8 bytes of the tokens predicted; summing a per-id table over the
targets gives those bytes exactly, for any slice of a token stream (an instance starts mid-document).

OLMo's tokenizers are byte-level BPE: ByteLevel maps each byte to one character, so a vocabulary
string of n characters is n bytes of text. A character outside that alphabet is read as its own UTF-8
bytes, as the ByteLevel decoder reads it. Special tokens (EOS, PAD) stand for no text and count 0;
other added tokens (OLMo's runs of spaces, `|||EMAIL_ADDRESS|||`) are matched in the text as written,
so they count their content's UTF-8 bytes. For a tokenizer that is not byte-level each id is decoded
alone, an approximation: a decoder that drops a leading space (Metaspace) or a byte-fallback piece
(half a character) makes one id's text differ from its share of a longer decode.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from megaolmo.data.tokenizer import load_tokenizer, tokenizer_fingerprint

BYTE_LEVEL = "ByteLevel"


@functools.cache
def _byte_level_alphabet() -> frozenset[str]:
    from tokenizers import pre_tokenizers

    return frozenset(pre_tokenizers.ByteLevel.alphabet())


def _is_byte_level(decoder: dict | None) -> bool:
    """Whether the tokenizer's decoder is ByteLevel, alone or in a Sequence."""
    if not decoder:
        return False
    if decoder.get("type") == "Sequence":
        return any(_is_byte_level(step) for step in decoder.get("decoders", []))
    return decoder.get("type") == BYTE_LEVEL


def _byte_level_length(token: str, alphabet: frozenset[str]) -> int:
    if all(char in alphabet for char in token):
        return len(token)
    return len(token.encode("utf-8"))


_tables: dict[str, np.ndarray] = {}  # by tokenizer fingerprint: two copies of a tokenizer share one table


def token_byte_lengths(tokenizer_path: Path) -> np.ndarray:
    """int64 [vocab size with added tokens]: the UTF-8 bytes of text each id stands for, read-only. Built
    once per tokenizer, however many held-out groups or data directories share it."""
    fingerprint = tokenizer_fingerprint(Path(tokenizer_path))
    if fingerprint not in _tables:
        _tables[fingerprint] = _byte_lengths(Path(tokenizer_path))
    return _tables[fingerprint]


def _byte_lengths(tokenizer_path: Path) -> np.ndarray:
    tokenizer = load_tokenizer(tokenizer_path)
    spec = json.loads(tokenizer.to_str())
    lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    added = {token["id"]: token for token in spec.get("added_tokens", [])}
    if _is_byte_level(spec.get("decoder")):
        alphabet = _byte_level_alphabet()
        for token, token_id in tokenizer.get_vocab(with_added_tokens=False).items():
            lengths[token_id] = _byte_level_length(token, alphabet)
    else:
        for token_id in range(len(lengths)):
            if token_id not in added:
                lengths[token_id] = len(tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8"))
    for token_id, token in added.items():
        lengths[token_id] = 0 if token.get("special") else len(token["content"].encode("utf-8"))
    lengths.setflags(write=False)  # shared by every caller
    return lengths
