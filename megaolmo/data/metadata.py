"""The `metadata.json` written next to prepared token memmaps, and the token dtype rule.

OLMo's memmaps carry no header, so the dtype and the tokenizer that made them live beside them
in this file; without it a uint32 file would silently read as twice as many uint16 tokens.

`prepare` commits a directory shard by shard and writes metadata.json last. Until then the directory
holds `prepare/plan.json` (the inputs, tokenizer and options) and one `prepare/shards/<name>.json` per
committed token file; `read_metadata` refuses such a directory, so training never reads half a corpus.
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
PREPARE_STATE_DIR = "prepare"  # the in-progress state of a prepare run, kept beside the token files
PLAN_FILE = "plan.json"
SHARD_RECORDS_DIR = "shards"


def token_dtype(vocab_size: int) -> np.dtype:
    """OLMo's rule: uint16 when every id fits (vocab < 65536), else uint32."""
    if vocab_size < 1:
        raise DataError(f"vocab size {vocab_size} must be positive")
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def refuse_incomplete(directory: Path) -> None:
    """Raise when `directory` is a prepare run that has not committed every shard yet."""
    plan_path = directory / PREPARE_STATE_DIR / PLAN_FILE
    if not plan_path.is_file():
        return
    try:
        shards = len(json.loads(plan_path.read_text())["inputs"])
    except (OSError, ValueError, KeyError, TypeError):
        shards = "?"
    committed = sum(1 for _ in (directory / PREPARE_STATE_DIR / SHARD_RECORDS_DIR).glob("*.json"))
    raise DataError(
        f"data in {directory} is still being prepared ({committed} of {shards} shards committed); "
        "run the same prepare command again to finish"
    )


def read_metadata(directory: Path) -> dict | None:
    """The metadata of a prepared-data directory, or None when it has none (e.g. OLMo's own memmaps)."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        refuse_incomplete(Path(directory))
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
