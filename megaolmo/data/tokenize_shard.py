"""One shard's tokenization: the work a `megaolmo.data.prepare` worker process does.

Reading a shard's good documents, tokenizing them in bounded batches into a token file under a temporary
name, and sizing a worker's tokenizer threads. A module of its own so that what a spawned worker runs (it
unpickles the function by module path) has one importable home, apart from the job that schedules it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaolmo.data.chat import label_mask_path, tokenize_chat_file
from megaolmo.data.dolma import BadLine, Document, read_dolma_file
from megaolmo.data.group_runs import GroupRuns
from megaolmo.data.groups import group_name
from megaolmo.data.tokenizer import load_tokenizer
from megaolmo.errors import DataError

BATCH_DOCUMENTS = 1024  # documents per encode_batch call
BATCH_CHARS = 8 << 20  # ... or fewer when they are long: bounds memory whatever the documents' size


@dataclass(frozen=True)
class ShardTask:
    """One input shard to tokenize into `<out_dir>/<name>`: everything a worker process needs."""

    src: Path
    out_dir: Path
    name: str
    tokenizer: Path
    dtype: str
    eos: int
    chat: bool
    max_bad_lines: int | None

    def temporary(self) -> Path:
        """Where the worker writes the token file before the commit renames it (never `*.npy`, so never read)."""
        return self.out_dir / f".{self.name}.tmp-{os.getpid()}"


def _batches(docs: Iterable[Document]) -> Iterator[list[Document]]:
    """Group documents into batches bounded in count and in characters."""
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.doc["text"])
        if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _good_documents(src: Path, bad: list[BadLine], max_bad_lines: int | None) -> Iterator[Document]:
    """The documents of `src`, its bad lines appended to `bad`; more than `max_bad_lines` of them fails the shard."""
    for item in read_dolma_file(src):
        if isinstance(item, BadLine):
            bad.append(item)
            if max_bad_lines is not None and len(bad) > max_bad_lines:
                raise DataError(
                    f"{item}; {len(bad)} bad lines in {src.name}, over the limit of {max_bad_lines} a shard "
                    "(--max-bad-lines)"
                )
            continue
        yield item


def tokenize_file(
    src: Path,
    dst: Path,
    tokenizer_path: Path,
    dtype: str,
    eos: int,
    *,
    max_bad_lines: int | None = None,
) -> dict:
    """Tokenize one Dolma file into the memmap `dst`; return its record (tokens, documents, per-source counts,
    group runs, bad lines) and, under "bad_line_reports", each skipped line's file:line and reason.

    A module-level function so a process pool can run it; it loads the tokenizer itself.
    """
    tokenizer = load_tokenizer(tokenizer_path)
    # A special token's string inside a document ("<|endoftext|>" in a web page about GPT) is text: the
    # only EOS ids in the stream are the document ends, and decoding gives the document back exactly.
    tokenizer.encode_special_tokens = True
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: faster
    sources: dict[str, dict[str, int]] = {}
    groups = GroupRuns()
    bad: list[BadLine] = []
    total_tokens = total_docs = 0
    with open(dst, "wb") as out:
        for batch in _batches(_good_documents(src, bad, max_bad_lines)):
            encodings = encode([item.doc["text"] for item in batch], add_special_tokens=False)
            ids: list[int] = []
            for item, encoding in zip(batch, encodings):
                ids.extend(encoding.ids)
                ids.append(eos)
                n_tokens = len(encoding.ids) + 1
                stats = sources.setdefault(str(item.doc["source"]), {"tokens": 0, "documents": 0, "bytes": 0})
                stats["tokens"] += n_tokens
                stats["documents"] += 1
                stats["bytes"] += item.utf8_bytes
                groups.add(group_name(item.doc), n_tokens)
            np.asarray(ids, dtype=dtype).tofile(out)
            total_tokens += len(ids)
            total_docs += len(batch)
    damage = next((b for b in bad if b.damaged), None)
    return {
        "input": str(src),
        "tokens": total_tokens,
        "documents": total_docs,
        "bytes": sum(s["bytes"] for s in sources.values()),
        "sources": dict(sorted(sources.items())),
        "groups": groups.runs,
        "bad_lines": len(bad),
        "damaged": None if damage is None else {"last_good_line": damage.line - 1, "reason": damage.reason},
        "bad_line_reports": [str(b) for b in bad],
    }


def run_shard_task(task: ShardTask) -> dict:
    """Tokenize one shard to its temporary name; the record says where ("temporary") for the commit.

    Whatever stops it (a bad shard, a signal) removes what it wrote, so only commits leave files behind.
    """
    start = time.perf_counter()
    tmp = task.temporary()
    try:
        if task.chat:
            record = tokenize_chat_file(task.src, tmp, task.tokenizer, task.dtype, task.eos)
            record |= {"bad_lines": 0, "damaged": None, "bad_line_reports": []}
        else:
            record = tokenize_file(
                task.src, tmp, task.tokenizer, task.dtype, task.eos, max_bad_lines=task.max_bad_lines
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        label_mask_path(tmp).unlink(missing_ok=True)
        raise
    return record | {"temporary": str(tmp), "seconds": time.perf_counter() - start}


def init_worker(threads: int) -> None:
    """Set up a pool worker before it loads a tokenizer: its share of the cores, and Ctrl-C left to the parent.

    The parent catches SIGINT and SIGTERM and terminates the workers; a worker that also caught SIGINT
    would print a traceback per process.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_tokenizer_threads(threads)


def set_tokenizer_threads(threads: int) -> None:
    """Size the Rayon pool of Hugging Face tokenizers; read once, when the process first encodes a batch."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["RAYON_RS_NUM_CPUS"] = str(threads)  # the name older tokenizers releases read
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"


def available_cores() -> int:
    """The cores this process may run on (a Slurm allocation's, not the whole node's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity
        return os.cpu_count() or 1
