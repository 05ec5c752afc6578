"""Benchmark rows: a table on stdout, readable at a glance, and optionally a CSV or JSON file."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def format_table(rows: list[dict[str, object]]) -> str:
    """Aligned columns; the union of the rows' keys in first-seen order, '-' where a row has no value."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    cells = [[str(row.get(column, "-")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in cells)
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    """The rows as CSV: the union of their keys in first-seen order as the header."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_rows(rows: list[dict[str, object]], out: str | None) -> None:
    """Print the table; with `out` ending in .csv or .json, also write the rows there."""
    print(format_table(rows))
    if out is None:
        return
    path = Path(out)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2) + "\n")
    elif path.suffix == ".csv":
        write_csv(path, rows)
    else:
        raise ValueError(f"--out {out}: use a .csv or .json file name")
    print(f"wrote {path}")
