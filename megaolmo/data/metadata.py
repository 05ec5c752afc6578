"""The `metadata.json` written next to prepared token memmaps, and the token dtype rule.

OLMo's memmaps carry no header, so the dtype and the tokenizer that made them live beside them
in this file; without it a uint32 file would silently read as twice as many uint16 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megaolmo.errors import DataError

FORMAT = "megaolmo-tokens"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """OLMo's rule: uint16 when every id fits (vocab < 65536), else uint32."""
    if vocab_size < 1:
        raise DataError(f"vocab size {vocab_size} must be positive")
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def read_metadata(directory: Path) -> dict | None:
    """The metadata of a prepared-data directory, or None when it has none (e.g. OLMo's own memmaps)."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); prepare the data again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not megaolmo token metadata (format {FORMAT!r}); prepare the data again")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {meta.get('format_version')!r}, this megaolmo reads {FORMAT_VERSION}; "
            "prepare the data again"
        )
    return meta
