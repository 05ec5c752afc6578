"""What a run leaves: a table on stdout and, with --out, the full results as JSON (written atomically)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from megaolmo.data.groups import source_of_group
from megaolmo.errors import EvalError


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def perplexity_table(results: dict[str, Any], *, domains: bool = False) -> str:
    """One line per source, then the overall line; with `domains`, each source's domains under it.

    Paloma has 585 domains in 16 sources, so the default table stays one screen long: a source's line
    gives its token-weighted numbers and the average of its domains' perplexities (Paloma's headline);
    every domain's numbers are always in the JSON under "groups".
    """
    named = [(name, s, False) for name, s in results["sources"].items()]
    named.append(("overall", {**results["overall"], "domain_average": results["domain_average"]}, False))
    if domains:
        by_source: dict[str, list[str]] = {}
        for group in results["groups"]:
            by_source.setdefault(source_of_group(group), []).append(group)
        with_domains = []
        for entry in named:
            groups = by_source.get(entry[0], [])
            with_domains.append(entry)
            if groups != [entry[0]]:  # a source without domains is its own single group: no second line
                with_domains += [(f"  {group}", results["groups"][group], True) for group in groups]
        named = with_domains
    width = max(12, *(len(name) for name, _, _ in named))
    header = f"{'source':<{width}} {'domains':>7} {'docs':>8} {'tokens':>12} {'bytes':>12} {'loss':>8}"
    lines = [f"{header} {'perplexity':>12} {'bpb':>8} {'domain-avg ppl':>14}"]
    for name, s, is_domain in named:
        count = "" if is_domain else s["domain_average"]["domains"]
        average = "" if is_domain else _number(s["domain_average"]["perplexity"], 3)
        lines.append(
            f"{name:<{width}} {count:>7} {s['documents']:>8} {s['tokens']:>12} {s['bytes']:>12} "
            f"{_number(s['loss'], 4):>8} {_number(s['perplexity'], 3):>12} {_number(s['bits_per_byte'], 4):>8} "
            f"{average:>14}".rstrip()
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
