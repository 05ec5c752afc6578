"""Held-out data by group (`data.valid_paths`): what the training loop's held-out metrics score.

A group is a source, or `source/domain` (megaolmo.data.groups' rule). `prepare` records in metadata.json,
per token file, `"groups": [[name, first_token, end_token], ...]`: the contiguous runs of documents of one
group, end exclusive. A file whose entry has no runs is one group: its source when it has one (the
built-in corpus's one file per package), else its stem, as is a file without metadata (OLMo's memmaps).

A group is all its runs across every file of every valid path; its instances are the `seq_len`-token
slices inside each run, in file order then run order. An instance never crosses a run boundary, so it
never mixes groups, and a run's trailing partial instance is dropped. Bits per byte divides by the
UTF-8 bytes of exactly the targets scored (megaolmo.data.token_bytes), counted with the tokenizer the
data was made with: the run's `data.tokenizer`, else the `tokenizer.json` beside prepared data; with
neither, a group reports no bits per byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megaolmo.data.batch import Batch
from megaolmo.data.dataset import inspect_token_file, memmap_files
from megaolmo.data.labels import IGNORE_INDEX
from megaolmo.data.memmap_cache import read_slice
from megaolmo.data.metadata import METADATA_FILE, TOKENIZER_FILE, read_metadata
from megaolmo.data.token_bytes import token_byte_lengths
from megaolmo.errors import DataError

BYTES_CHUNK_ROWS = 256  # instances read at a time to count a group's target bytes


@dataclass(frozen=True)
class Run:
    """`instances` instances of a group in the token file `path`, the first starting at token `first_token`."""

    path: Path
    dtype: np.dtype
    first_token: int
    instances: int


class HeldOutGroup:
    """One group's held-out instances (int64 [seq_len] rows, read lazily through the memmap cache), and the
    byte table of the tokenizer that made them, when known."""

    def __init__(self, name: str, seq_len: int, runs: Sequence[Run], token_bytes: np.ndarray | None) -> None:
        self.name, self.seq_len, self.runs, self.token_bytes = name, seq_len, list(runs), token_bytes
        self._starts = np.cumsum([0, *(run.instances for run in self.runs)], dtype=np.int64)
        self._target_bytes: dict[int, int] = {}  # by instance count: the data does not change during a run

    def __len__(self) -> int:
        return int(self._starts[-1])

    def get_batch(self, indices: np.ndarray | Sequence[int]) -> Batch:
        """Instances `indices` as a Batch of int64 token ids [len(indices), seq_len]."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"instances {indices.min()}..{indices.max()} out of range for group {self.name}")
        tokens = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for row, index in enumerate(indices):
            r = int(np.searchsorted(self._starts, index, side="right")) - 1
            run = self.runs[r]
            start = run.first_token + (int(index) - int(self._starts[r])) * self.seq_len
            tokens[row] = read_slice(run.path, run.dtype, start, start + self.seq_len)
        return Batch(torch.from_numpy(tokens))

    def target_bytes(self, count: int) -> int | None:
        """UTF-8 bytes of the targets (`Batch.labels()`) of the first `count` instances; None without a
        tokenizer. Counted once per count, then remembered."""
        if self.token_bytes is None:
            return None
        if count not in self._target_bytes:
            total = 0
            for start in range(0, count, BYTES_CHUNK_ROWS):
                labels = self.get_batch(range(start, min(start + BYTES_CHUNK_ROWS, count))).labels()
                targets = labels[labels != IGNORE_INDEX].numpy()
                if targets.size and targets.max() >= len(self.token_bytes):
                    raise DataError(
                        f"held-out group {self.name} holds token id {targets.max()}, beyond the tokenizer's "
                        f"{len(self.token_bytes)} ids; the data was made with another tokenizer"
                    )
                total += int(self.token_bytes[targets].sum())
            self._target_bytes[count] = total
        return self._target_bytes[count]


def file_runs(path: Path, n_tokens: int, entry: dict) -> list[tuple[str, int, int]]:
    """(group, first token, end token) of each run of the token file `path`, from its metadata.json
    `entry` ({} without one): its recorded runs, else the whole file as its one source, else as its stem."""
    recorded = entry.get("groups")
    if recorded is None:
        sources = list(entry.get("sources") or {})
        return [(sources[0] if len(sources) == 1 else path.stem, 0, n_tokens)]
    runs, previous_end = [], 0
    for item in recorded:
        valid = isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[0], str)
        valid = valid and all(isinstance(bound, int) for bound in item[1:])
        if not valid or not previous_end <= item[1] < item[2] <= n_tokens:
            raise DataError(
                f"{path}: {METADATA_FILE} group run {item!r} is not [name, first_token, end_token] with "
                f"ordered, disjoint runs inside its {n_tokens} tokens; prepare the data again"
            )
        runs.append((item[0], item[1], item[2]))
        previous_end = item[2]
    return runs


def _tokenizer_of(directory: Path, metadata: dict | None, tokenizer: Path | None) -> Path | None:
    """The tokenizer that made the data in `directory`: the run's, else the one prepare copied beside it."""
    if tokenizer is not None:
        return tokenizer
    if metadata is None:
        return None
    beside = directory / metadata.get("tokenizer", TOKENIZER_FILE)
    return beside if beside.is_file() else None


def held_out_groups(
    paths: Sequence[str | Path], seq_len: int, *, dtype: np.dtype | str | None = None, tokenizer: Path | None = None
) -> dict[str, HeldOutGroup]:
    """The held-out groups of `paths` (prepared directories or token files), in order of first appearance.

    Only stats files and reads metadata.json; tokens are read when evaluated. `dtype` is for files
    without metadata.json, `tokenizer` the run's (`data.tokenizer`), for bits per byte.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len={seq_len!r} must be a positive integer")
    if not paths:
        return {}  # a run without held-out data
    metadata: dict[Path, dict | None] = {}
    runs: dict[str, list[Run]] = {}
    tables: dict[str, list[np.ndarray | None]] = {}
    for path in memmap_files(paths):
        directory = path.parent
        if directory not in metadata:
            metadata[directory] = read_metadata(directory)
        meta = metadata[directory]
        file_dtype, n_tokens, entry = inspect_token_file(path, dtype, meta)
        tokenizer_path = _tokenizer_of(directory, meta, tokenizer)
        table = None if tokenizer_path is None else token_byte_lengths(tokenizer_path)
        for name, first, end in file_runs(path, n_tokens, entry):
            runs.setdefault(name, []).append(Run(path, file_dtype, first, (end - first) // seq_len))
            tables.setdefault(name, []).append(table)
    groups = {}
    for name, group_runs in runs.items():
        first_table = tables[name][0]
        # one byte table for the whole group: every run made by the same tokenizer (tables are shared per tokenizer)
        same = all(table is first_table for table in tables[name])
        groups[name] = HeldOutGroup(name, seq_len, group_runs, first_table if same else None)
    return groups
