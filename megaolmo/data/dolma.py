"""Streaming reader of Dolma documents: one JSON object per line, plain, gzipped or zstd-compressed.

Dolma's own files are `*.json.gz` (v1.5, v1.6) and `*.json.zst` / `*.jsonl.zst` (v1.7 and later mirrors);
`*.json`, `*.jsonl` and `*.jsonl.gz` are accepted too because that is what people write by hand. Reading
streams line by line, so a file of any size costs constant memory.

Two readers share one parser: `iter_documents` is strict (a bad line stops with its file and line), and
`read_dolma_file` yields a `BadLine` for each line that is not a document, so `prepare` can skip and
count them over thousands of shards instead of losing a day's work to one broken line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from megaolmo.data.jsonl import DamagedFile, decode_json_object, raw_lines
from megaolmo.errors import DataError

SUFFIXES = (".json.gz", ".jsonl.gz", ".json.zst", ".jsonl.zst", ".json", ".jsonl")
IGNORED_NAMES_SHOWN = 5  # names listed in the note about a directory's other files


class Document(NamedTuple):
    """A document, its line in the file and the UTF-8 size of its text (what bits per byte divides by)."""

    line: int
    doc: dict
    utf8_bytes: int


@dataclass(frozen=True)
class BadLine:
    """A line that is not a document, or (`damaged`) the point where a compressed file's data breaks off."""

    path: Path
    line: int
    reason: str
    damaged: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.damaged else f"{self.path}:{self.line}: {self.reason}"


def dolma_stem(path: Path) -> str:
    """The file name without its Dolma suffix (`cc_en_head-0001.json.gz` -> `cc_en_head-0001`)."""
    for suffix in SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _note_ignored(directory: Path, ignored: list[Path]) -> None:
    """Say which files of a directory are not read: a README or a checksum list is normal there, a
    `.json.bz2` is data that a user would otherwise believe was tokenized."""
    names = [str(p.relative_to(directory)) for p in ignored]
    shown = ", ".join(names[:IGNORED_NAMES_SHOWN]) + (", ..." if len(names) > IGNORED_NAMES_SHOWN else "")
    print(
        f"note: {directory}: ignoring {len(names)} file(s) without a Dolma suffix "
        f"({' '.join('*' + s for s in SUFFIXES)}): {shown}",
        file=sys.stderr,
    )


def dolma_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand `paths` into Dolma files, in order: a directory contributes all its Dolma files (recursively,
    sorted), and its other files are named on stderr; a file given by name must have a Dolma suffix."""
    if isinstance(paths, (str, Path)):
        paths = [paths]  # one path, not a sequence of characters
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            everything = sorted(p for p in path.rglob("*") if p.is_file())
            found = [p for p in everything if p.name.endswith(SUFFIXES)]
            if not found:
                raise DataError(f"{path}: no Dolma files ({', '.join('*' + s for s in SUFFIXES)}) in this directory")
            if len(found) < len(everything):
                _note_ignored(path, [p for p in everything if not p.name.endswith(SUFFIXES)])
            files.extend(found)
        elif path.is_file():
            if not path.name.endswith(SUFFIXES):
                raise DataError(f"{path}: not a Dolma file; expected a name ending in {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


def _document(line: bytes, source: str) -> tuple[dict, int] | str:
    """The document on one line with its text's UTF-8 size, or why the line is not a document."""
    doc = decode_json_object(line, "document")
    if isinstance(doc, str):
        return doc
    text = doc.get("text")
    if not isinstance(text, str):
        what = "has no" if "text" not in doc else "has a non-string"
        return f"document {what} 'text' field; every document needs its text"
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "document text is not valid Unicode (a lone surrogate escape such as \\ud800)"
    doc.setdefault("source", source)
    return doc, size


def read_dolma_file(path: Path) -> Iterator[Document | BadLine]:
    """Every non-blank line of one Dolma file as a `Document` or a `BadLine`; a damaged compressed file
    ends with a `BadLine(damaged=True)` at the first line it could not read."""
    source = dolma_stem(path)
    try:
        for number, line in raw_lines(path):
            if not line.strip():
                continue
            parsed = _document(line, source)
            if isinstance(parsed, str):
                yield BadLine(path, number, parsed)
            else:
                yield Document(number, *parsed)
    except DamagedFile as err:
        kind = "zstd" if path.name.endswith(".zst") else "gzip"
        reason = f"corrupt {kind} file ({err.reason}) after line {err.last_good_line}"
        yield BadLine(path, err.last_good_line + 1, reason, damaged=True)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def iter_documents(paths: Sequence[str | Path]) -> Iterator[dict]:
    """Stream the documents of Dolma files and directories, in order; a bad line stops with its file and line.

    Every file is checked to exist before the first document is yielded, so a typo in the last
    path fails at once rather than after hours of work. A document without "source" gets its
    file's stem, so per-source statistics always have a name to use.
    """
    for path in dolma_files(paths):
        for item in read_dolma_file(path):
            if isinstance(item, BadLine):
                raise DataError(f"{item}; write it again" if item.damaged else str(item))
            yield item.doc
