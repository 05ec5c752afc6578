"""Reading JSON-lines files (plain or gzipped), where a bad line stops with its file and line number."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path


def json_objects(path: Path, error: type[Exception], item: str = "record") -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`; anything unreadable raises `error`
    with one line that names the file (and the line), `item` naming what a line should hold."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise error(f"{path}:{number}: not valid JSON ({err.msg}); one {item} per line") from None
                if not isinstance(record, dict):
                    raise error(f"{path}:{number}: a {type(record).__name__} instead of a JSON object {item}")
                yield number, record
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason} at byte {err.start} of a line)") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise error(f"{path}: corrupt gzip file ({err}); write it again") from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from None
