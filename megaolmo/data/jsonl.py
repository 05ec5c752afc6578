"""Reading JSON-lines files, plain, gzipped or zstd-compressed, line by line in constant memory.

`raw_lines` is the one reader underneath: it decompresses in fixed-size chunks and yields the complete
lines. A compressed file that ends early (a download cut short) or holds corrupt data yields every
complete line before the damage and then raises `DamagedFile` naming the last good line, so what is kept
of a damaged shard is the same on every machine. `json_objects` builds the strict reader on it, where
anything unreadable raises one line that names the file and the line.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from megaolmo.errors import DataError

CHUNK_BYTES = 1 << 20  # compressed bytes read at a time; fixed, so a damaged file keeps the same lines everywhere
GZIP_WBITS = 31  # zlib's "gzip container" mode


class DamagedFile(Exception):
    """A compressed file whose data stops making sense after line `last_good_line` (0: before the first)."""

    def __init__(self, reason: str, last_good_line: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.last_good_line = last_good_line


class _CorruptData(Exception):
    """Raised by the decompressing chunk readers; `raw_lines` adds the line it happened after."""


def _gunzip(raw: BinaryIO) -> Iterator[bytes]:
    """Decompressed chunks of a gzip file, members concatenated (as `cat a.gz b.gz` writes them)."""
    inflater = zlib.decompressobj(wbits=GZIP_WBITS)
    member_started = False
    while chunk := raw.read(CHUNK_BYTES):
        while chunk:
            if not member_started:
                chunk = chunk.lstrip(b"\0")  # zero padding after the last member, as gzip tolerates
                if not chunk:
                    break
            member_started = True
            try:
                data = inflater.decompress(chunk)
            except zlib.error as err:
                raise _CorruptData(f"corrupt gzip data ({err})") from None
            if data:
                yield data
            if not inflater.eof:
                break
            chunk = inflater.unused_data
            inflater = zlib.decompressobj(wbits=GZIP_WBITS)
            member_started = False
    if member_started and not inflater.eof:
        raise _CorruptData("the gzip data ends early (a truncated file)")


def _zstandard():
    """The `zstandard` package, imported only for .zst files."""
    try:
        import zstandard
    except ImportError:
        raise DataError("reading .zst files needs the zstandard package; pip install zstandard") from None
    return zstandard


def _unzstd(raw: BinaryIO) -> Iterator[bytes]:
    """Decompressed chunks of a zstd file, frames concatenated."""
    zstandard = _zstandard()
    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    frame_started = False
    while chunk := raw.read(CHUNK_BYTES):
        while chunk:
            frame_started = True
            try:
                data = frame.decompress(chunk)
            except zstandard.ZstdError as err:
                raise _CorruptData(f"corrupt zstd data ({err})") from None
            if data:
                yield data
            if not frame.eof:
                break
            chunk = frame.unused_data
            frame = decompressor.decompressobj()
            frame_started = False
    if frame_started and not frame.eof:
        raise _CorruptData("the zstd data ends early (a truncated file)")


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as raw:
        if path.name.endswith(".gz"):
            yield from _gunzip(raw)
        elif path.name.endswith(".zst"):
            yield from _unzstd(raw)
        else:
            while chunk := raw.read(CHUNK_BYTES):
                yield chunk


def raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without the newline) for every line of `path`, blank lines included.

    A damaged compressed file raises `DamagedFile` after its last complete line; the incomplete line
    the damage cut is not yielded. A plain file's last line needs no newline.
    """
    number = 0
    pending: list[bytes] = []  # the start of a line that continues in the next chunk
    try:
        for chunk in _chunks(path):
            pieces = chunk.split(b"\n")
            if len(pieces) == 1:
                pending.append(chunk)
                continue
            pending.append(pieces[0])
            number += 1
            yield number, b"".join(pending)
            for line in pieces[1:-1]:
                number += 1
                yield number, line
            pending = [pieces[-1]]
    except _CorruptData as err:
        raise DamagedFile(str(err), number) from None
    if rest := b"".join(pending):
        yield number + 1, rest


def decode_json_object(line: bytes, item: str) -> dict | str:
    """The JSON object on one line, or why the line is not one (a one-line reason, `item` naming the object)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 text ({err.reason} at byte {err.start})"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg}); one {item} per line"
    except RecursionError:
        return "JSON nested too deeply"
    if not isinstance(record, dict):
        return f"a {type(record).__name__} instead of a JSON object {item}"
    return record


def json_objects(path: Path, error: type[Exception], item: str = "record") -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`; anything unreadable raises `error`
    with one line that names the file (and the line), `item` naming what a line should hold."""
    try:
        for number, line in raw_lines(path):
            if not line.strip():
                continue
            record = decode_json_object(line, item)
            if isinstance(record, str):
                raise error(f"{path}:{number}: {record}")
            yield number, record
    except DamagedFile as err:
        kind = "zstd" if path.name.endswith(".zst") else "gzip"
        raise error(
            f"{path}: corrupt {kind} file ({err.reason}, after line {err.last_good_line}); write it again"
        ) from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from None
