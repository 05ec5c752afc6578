"""Checks of benchmark rows that hold on any machine: figures present and well-formed, never how fast."""

from __future__ import annotations

import math


def assert_well_formed(rows: list[dict], columns: list[str], figures: list[str]) -> None:
    """Every row has exactly `columns`, in order; each of `figures` is a finite, non-negative number.

    A figure may be 0: a slow machine rounds a small throughput down, and that is no failure.
    """
    assert rows, "no rows"
    for row in rows:
        assert list(row) == columns, (list(row), columns)
        for key in figures:
            value = row[key]
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, row)
            assert math.isfinite(value) and value >= 0, (key, row)
