"""Streaming reader of Dolma documents: one JSON object per line, gzipped or plain.

Dolma's own files are `*.json.gz`; `*.jsonl` and `*.jsonl.gz` are accepted too because that is
what people write by hand. Reading streams line by line, so a file of any size costs constant memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from megaolmo.data.jsonl import json_objects
from megaolmo.errors import DataError

SUFFIXES = (".json.gz", ".jsonl.gz", ".jsonl")


def dolma_stem(path: Path) -> str:
    """The file name without its Dolma suffix (`cc_en_head-0001.json.gz` -> `cc_en_head-0001`)."""
    for suffix in SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def dolma_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand `paths` into Dolma files, in order: a directory contributes all its Dolma files (recursively, sorted)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]  # one path, not a sequence of characters
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
            if not found:
                raise DataError(f"{path}: no Dolma files ({', '.join('*' + s for s in SUFFIXES)}) in this directory")
            files.extend(found)
        elif path.is_file():
            if not path.name.endswith(SUFFIXES):
                raise DataError(f"{path}: not a Dolma file; expected a name ending in {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


def _read_file(path: Path) -> Iterator[dict]:
    """Documents of one Dolma file; a bad line stops with its file and line number."""
    source = dolma_stem(path)
    for number, doc in json_objects(path, DataError, "document"):
        if not isinstance(doc.get("text"), str):
            what = "has no" if "text" not in doc else "has a non-string"
            raise DataError(f"{path}:{number}: document {what} 'text' field; every document needs its text")
        doc.setdefault("source", source)
        yield doc


def iter_documents(paths: Sequence[str | Path]) -> Iterator[dict]:
    """Stream the documents of Dolma files and directories, in order.

    Every file is checked to exist before the first document is yielded, so a typo in the last
    path fails at once rather than after hours of work. A document without "source" gets its
    file's stem, so per-source statistics always have a name to use.
    """
    for path in dolma_files(paths):
        yield from _read_file(path)
