"""Byte-level BPE tokenizers (Hugging Face `tokenizers` JSON files), as OLMo uses them.

OLMo's official tokenizer is a `tokenizers` JSON (vocab 50280, `<|endoftext|>` = 50279). Tests and
the built-in corpus cannot download it, so they train a small byte-level BPE of the same kind here.
A tokenizer file is identified by the sha256 of its bytes: data prepared with one tokenizer must
never be fed to a model trained with another, and the fingerprint is how that is checked.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from megaolmo.errors import DataError

if TYPE_CHECKING:
    import tokenizers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1, in this order
BYTE_ALPHABET = 256


def _tokenizers():
    """The `tokenizers` package, imported only when needed so reading memmaps does not require it."""
    try:
        import tokenizers
    except ImportError:
        raise DataError("the data pipeline needs Hugging Face tokenizers; pip install tokenizers") from None
    return tokenizers


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, path: Path) -> None:
    """Train a byte-level BPE of exactly `vocab_size` tokens on `texts` and save it as JSON at `path`.

    `<|endoftext|>` gets id 0 (EOS) and `<|padding|>` id 1 (PAD). No prefix space is added, so
    decoding gives back the exact text. Training is deterministic: the same texts give the same file
    bytes, hence the same fingerprint on every rank and every node.
    """
    smallest = len(SPECIAL_TOKENS) + BYTE_ALPHABET
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        raise DataError(f"tokenizer vocab {vocab_size!r} is too small; a byte-level BPE needs at least {smallest}")
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    got = tokenizer.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise DataError(
            f"the training text yields only {got} BPE tokens, fewer than the vocab {vocab_size} asked for; "
            "train on more text or ask for a smaller vocab"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tokenizer.save(str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tokenizer(path: str | Path) -> tokenizers.Tokenizer:
    """A tokenizer from its JSON file, with truncation and padding off (documents are never cut)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer {path} does not exist; pass a Hugging Face tokenizer.json")
    tk = _tokenizers()
    try:
        tokenizer = tk.Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for any bad file
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"tokenizer {path} cannot be loaded ({first_line}); pass a Hugging Face tokenizer.json"
        ) from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def tokenizer_fingerprint(path: str | Path) -> str:
    """The sha256 (hex) of the tokenizer file's bytes: equal fingerprints mean identical token ids."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer {path} does not exist; pass a Hugging Face tokenizer.json")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def eos_id(tokenizer: tokenizers.Tokenizer) -> int:
    """The id of `<|endoftext|>` (0 for ours, 50279 for OLMo's official tokenizer)."""
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise DataError(f"the tokenizer has no {EOS_TOKEN} token to end documents with; use one that has it")
    return int(token_id)


def vocab_size(tokenizer: tokenizers.Tokenizer) -> int:
    """One more than the largest token id: the number of rows a model's embedding needs for this data."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def tokenizer_summary(path: str | Path) -> dict:
    """Fingerprint, vocab size and EOS id of a tokenizer file (what the data's metadata records)."""
    tokenizer = load_tokenizer(path)
    return {"fingerprint": tokenizer_fingerprint(path), "vocab_size": vocab_size(tokenizer), "eos": eos_id(tokenizer)}


__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "eos_id",
    "load_tokenizer",
    "tokenizer_fingerprint",
    "tokenizer_summary",
    "train_bpe_tokenizer",
    "vocab_size",
]
