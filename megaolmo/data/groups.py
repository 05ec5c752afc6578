"""The group a document is reported under: its source, and its domain when it names one.

One rule for every place that splits data by where it came from: `prepare` records each token file's
runs of groups, the training loop's held-out metrics and `python -m megaolmo.eval perplexity` report per
group. Dolma documents carry `source`; Paloma's carry `source` and `subdomain` (585 of them over 16
sources), and some corpora put a `domain` at the top level or inside `metadata` (a dict, or a JSON
string as Paloma writes it).
"""

from __future__ import annotations

import json

UNKNOWN_SOURCE = "unknown"
DOMAIN_KEYS = ("subdomain", "domain")


def _metadata(doc: dict) -> dict:
    """The document's `metadata` as a dict: Paloma stores it as a JSON string."""
    metadata = doc.get("metadata")
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            return {}
    return metadata if isinstance(metadata, dict) else {}


def document_domain(doc: dict) -> str | None:
    """`subdomain` or `domain`, at the top level first, then inside `metadata`; None when there is none."""
    for place in (doc, _metadata(doc)):
        for key in DOMAIN_KEYS:
            value = place.get(key)
            if value is not None and value != "":
                return str(value)
    return None


def document_source(doc: dict) -> str:
    return str(doc.get("source") or UNKNOWN_SOURCE)


def group_name(doc: dict) -> str:
    """`source`, or `source/domain` when the document names a domain."""
    domain = document_domain(doc)
    source = document_source(doc)
    return source if domain is None else f"{source}/{domain}"


def source_of_group(group: str) -> str:
    """The source part of a group name (`m2d2_s2orc/Mathematics` -> `m2d2_s2orc`)."""
    return group.split("/", 1)[0]
