"""The on-disk state of a resumable `megaolmo.data.prepare` job, read and written in one place.

The plan a re-run must match, the committed shards' records, the commit of one shard (its files renamed into
place, then its record), the removal of what uncommitted shards left half-written, metadata.json from the
records alone, and the atomic writes that leave a reader only whole files whenever the job is stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from megaolmo.atomic import refuse_existing
from megaolmo.data.chat import LABEL_MASK_DIR, label_mask_path
from megaolmo.data.dolma import dolma_stem
from megaolmo.data.metadata import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    PLAN_FILE,
    PREPARE_STATE_DIR,
    SHARD_RECORDS_DIR,
    TOKENIZER_FILE,
)
from megaolmo.data.tokenize_shard import ShardTask
from megaolmo.data.tokenizer import tokenizer_summary
from megaolmo.errors import DataError

PLAN_FORMAT = "megaolmo-prepare-plan"
SAMPLE_FILE = "tokenizer-sample.json"  # in the state directory: how the trained tokenizer's sample was drawn


def output_names(files: list[Path]) -> list[str]:
    """`<stem>.npy` per input file; two inputs with one stem would overwrite each other, so refuse them."""
    seen: dict[str, Path] = {}
    for path in files:
        name = dolma_stem(path) + ".npy"
        if name in seen:
            raise DataError(f"inputs {seen[name]} and {path} would both write {name}; rename one of them")
        seen[name] = path
    return list(seen)


def write_atomically(path: Path, text: str) -> None:
    """Write `text` under a temporary name and rename it: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_atomically(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


def job_plan(files: list[Path], names: list[str], tokenizer: dict, chat: bool) -> dict:
    """What a run commits to: a resumed run must have the same inputs, tokenizer and options."""
    return {
        "format": PLAN_FORMAT,
        "inputs": [
            {"path": str(path.resolve()), "name": name, "bytes": path.stat().st_size}
            for path, name in zip(files, names)
        ],
        "tokenizer": tokenizer,
        "chat": chat,
    }


def _plan_difference(old: dict, new: dict) -> str | None:
    """One phrase naming how two plans differ, or None when they are the same."""
    if old.get("format") != PLAN_FORMAT:
        return f"its {PLAN_FILE} is not a megaolmo prepare plan"
    before, now = old.get("inputs", []), new["inputs"]
    if before != now:
        if len(before) != len(now):
            return f"it was started on {len(before)} input files, this command gives {len(now)}"
        i, (a, b) = next((i, pair) for i, pair in enumerate(zip(before, now)) if pair[0] != pair[1])
        return f"input {i} was {a['path']} ({a['bytes']} bytes), this command gives {b['path']} ({b['bytes']} bytes)"
    if old.get("tokenizer") != new["tokenizer"]:
        return f"it was started with tokenizer {old.get('tokenizer')}, this command gives {new['tokenizer']}"
    if old.get("chat") != new["chat"]:
        return f"it was started with chat={old.get('chat')}, this command gives chat={new['chat']}"
    return None


def shard_records(state: Path) -> dict[str, dict]:
    """The committed shards' records, by token file name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((state / SHARD_RECORDS_DIR).glob("*.npy.json"))}


def final_metadata(plan: dict, records: dict[str, dict], summary: dict, dtype: np.dtype, state: Path) -> dict:
    """metadata.json from the plan and the shard records alone, so every run that writes it writes the same bytes."""
    per_file = {entry["name"]: records[entry["name"]] for entry in plan["inputs"]}
    results = list(per_file.values())
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": summary["fingerprint"],
        "tokenizer": TOKENIZER_FILE,
        "vocab_size": summary["vocab_size"],
        "dtype": dtype.name,
        "eos_token_id": summary["eos"],
        "files": per_file,
        "tokens": sum(r["tokens"] for r in results),
        "documents": sum(r["documents"] for r in results),
        "bytes": sum(r["bytes"] for r in results),
        "sources": sorted({source for r in results for source in r["sources"]}),
        "bad_lines": sum(r["bad_lines"] for r in results),
        "damaged_files": [name for name, r in per_file.items() if r["damaged"]],
    }
    if (state / SAMPLE_FILE).is_file():
        metadata["tokenizer_sample"] = json.loads((state / SAMPLE_FILE).read_text())
    if plan["chat"]:  # np.bool_ masks with the token files' names, in this subdirectory
        metadata.update(label_masks=LABEL_MASK_DIR, targets=sum(r["targets"] for r in results))
    return metadata


def open_directory(out_dir: Path, plan: dict) -> bool:
    """Start or resume the resumable directory `out_dir` under `plan`; True when this call created it.

    A complete directory, a different plan, or a non-empty directory that is no prepare run is refused.
    """
    state = out_dir / PREPARE_STATE_DIR
    if (out_dir / METADATA_FILE).exists():
        raise DataError(
            f"output {out_dir} already exists and is not empty (already prepared: it has {METADATA_FILE}); "
            "choose a new directory or remove it"
        )
    created = not out_dir.exists()
    if (state / PLAN_FILE).is_file():
        try:
            old = json.loads((state / PLAN_FILE).read_text())
        except ValueError:
            old = {}
        if (difference := _plan_difference(old, plan)) is not None:
            raise DataError(
                f"{out_dir} is being prepared under another plan: {difference}; run the command that started it, "
                "or choose a new directory"
            )
        return False
    if not state.is_dir():  # another part of the same job may have just made the state directory: that is fine
        refuse_existing(out_dir, DataError)
    (state / SHARD_RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    write_atomically(state / PLAN_FILE, json.dumps(plan, indent=2) + "\n")
    return created


def tokenizer_spec(tokenizer_path: Path | None, vocab: int | None, sample: int) -> dict:
    if tokenizer_path is not None:
        return {"fingerprint": tokenizer_summary(tokenizer_path)["fingerprint"]}  # fails on a bad tokenizer early
    return {"train_vocab": vocab, "sample_documents": sample}


def remove_temporaries(tasks: list[ShardTask]) -> None:
    """Delete the half-written files of these (uncommitted) shards, whichever process wrote them."""
    for task in tasks:
        for stale in [
            *task.out_dir.glob(f".{task.name}.tmp-*"),
            *(task.out_dir / LABEL_MASK_DIR).glob(f".{task.name}.tmp-*"),
        ]:
            stale.unlink(missing_ok=True)


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back while a shard commits, so a shard is committed whole or not at all."""
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def commit_shard(task: ShardTask, record: dict, state: Path) -> None:
    """Rename the shard's files into place, then write its record: a shard is committed once its record is."""
    tmp = Path(record.pop("temporary"))
    with _signals_blocked():
        if task.chat:
            label_mask_path(tmp).replace(label_mask_path(task.out_dir / task.name))
        tmp.replace(task.out_dir / task.name)
        write_atomically(state / SHARD_RECORDS_DIR / f"{task.name}.json", json.dumps(record, indent=2) + "\n")
