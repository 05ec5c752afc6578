"""What a run leaves: a table on stdout and, with --out, the full results as JSON (written atomically)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from megaolmo.errors import EvalError


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def perplexity_table(results: dict[str, Any]) -> str:
    """One line per group, then the overall line."""
    rows = [(name, summary) for name, summary in results["groups"].items()] + [("overall", results["overall"])]
    width = max(12, *(len(name) for name, _ in rows))
    lines = [f"{'group':<{width}} {'docs':>8} {'tokens':>12} {'bytes':>12} {'loss':>8} {'perplexity':>12} {'bpb':>8}"]
    for name, s in rows:
        lines.append(
            f"{name:<{width}} {s['documents']:>8} {s['tokens']:>12} {s['bytes']:>12} {_number(s['loss'], 4):>8} "
            f"{_number(s['perplexity'], 3):>12} {_number(s['bits_per_byte'], 4):>8}"
        )
    return "\n".join(lines)


def downstream_table(results: dict[str, Any]) -> str:
    """One line per task (accuracy in percent, as OLMo reports it), then the average."""
    tasks = results["tasks"]
    width = max(12, *(len(name) for name in tasks))
    lines = [f"{'task':<{width}} {'normalization':<14} {'examples':>8} {'accuracy':>9}"]
    for name, r in tasks.items():
        lines.append(f"{name:<{width}} {r['normalization']:<14} {r['examples']:>8} {100 * r['accuracy']:>9.2f}")
    lines.append(f"{'average':<{width}} {'':<14} {'':>8} {100 * results['average']:>9.2f}")
    return "\n".join(lines)


def check_out(path: str | None) -> Path | None:
    """Refuse an --out whose directory is missing before any work is done, not after it."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise EvalError(f"--out {out} is a directory; give a file name such as {out / 'results.json'}")
    if not out.parent.is_dir():
        raise EvalError(f"--out {out}: directory {out.parent} does not exist")
    return out


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write under a temporary name and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
