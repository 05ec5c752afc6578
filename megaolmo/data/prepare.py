"""Tokenize Dolma documents (or, with --chat, instruction data) into OLMo-format token memmaps.

    python -m megaolmo.data.prepare INPUT... --out DIR (--tokenizer TOKENIZER.json | --train-tokenizer VOCAB)
                                    [--workers N] [--shard-index I --num-shards N] [--max-bad-lines N] ...

Every input file (a shard) becomes `<out>/<input stem>.npy`: raw token ids (no header, despite the suffix),
uint16 when the vocab fits, else uint32; each document tokenized without BOS and followed by EOS, all
concatenated. That is OLMo's layout, so OLMo's own memmaps and these read the same way. `<out>/metadata.json`
records the dtype, the tokenizer's fingerprint and, per file and per source, the tokens, documents and UTF-8
bytes (bits per byte needs the bytes), each file's runs of document groups and its bad lines; the tokenizer
is copied to `<out>/tokenizer.json`. Special-token strings inside a document are tokenized as plain text
(OLMo's own script would turn a literal `<|endoftext|>` into EOS), so EOS ids mark document ends only.

The command is a resumable job, sized for Dolma (thousands of shards, days of CPU): each shard is committed
on its own as it finishes (its token file renamed into place, then its record `<out>/prepare/shards/<name>.json`
written), under a plan (`<out>/prepare/plan.json`: the inputs, the tokenizer, the options) that a re-run must
match. Run the same command again after a crash, a time limit or Ctrl-C and it tokenizes only the shards not
committed; metadata.json is written last, once every shard is, so the output is byte for byte that of one
uninterrupted run, and training refuses the directory until then. SIGTERM and SIGINT stop the worker
processes and leave only committed shards. `--shard-index I --num-shards N` tokenizes every N-th shard
(a Slurm array task each), all into the same directory; whichever part sees every shard committed writes
metadata.json. A line that is not a document, or the damaged tail of a compressed shard, is skipped,
counted and named on stderr; `--max-bad-lines` (per shard) and `--max-bad-lines-total` make them fatal.

The Python function `prepare()` is the all-or-nothing form (the built-in corpus uses it): the directory
appears only once complete, and by default any bad line is an error.
With --chat the inputs are instruction JSONL files (megaolmo.data.chat): each conversation is rendered
with open-instruct's tulu template and packed the same way, and a label mask per token file
(`<out>/label_masks/<name>.npy`, np.bool_, True on the assistant turns) is written beside it; the
metadata records it (`label_masks`, and the targets per file).
A bad command line or input stops with one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from megaolmo.atomic import atomic_directory
from megaolmo.data.chat import LABEL_MASK_DIR
from megaolmo.data.dolma import BadLine, dolma_files, read_dolma_file
from megaolmo.data.metadata import METADATA_FILE, PREPARE_STATE_DIR, TOKENIZER_FILE, token_dtype
from megaolmo.data.prepare_pool import PrepareInterrupted, run_tasks, signals_interrupt
from megaolmo.data.prepare_state import (
    SAMPLE_FILE,
    commit_shard,
    copy_atomically,
    final_metadata,
    job_plan,
    open_directory,
    output_names,
    remove_temporaries,
    shard_records,
    tokenizer_spec,
    write_atomically,
)
from megaolmo.data.tokenize_shard import ShardTask, available_cores
from megaolmo.data.tokenizer import tokenizer_summary, train_bpe_tokenizer
from megaolmo.errors import DataError, MegaolmoError, report

TOKENIZER_SAMPLE_DOCUMENTS = 500_000  # a BPE vocab is settled long before this; Dolma has 5 billion documents
CLI_MAX_BAD_LINES = 1000  # per shard: a few broken lines are skipped, a shard that is mostly not Dolma fails


@dataclass
class PrepareReport:
    """What a prepare run did: the metadata once the directory is complete, and this run's throughput."""

    out_dir: Path
    metadata: dict | None
    shards: int
    committed: int
    run_shards: int = 0
    run_tokens: int = 0
    run_documents: int = 0
    seconds: float = 0.0
    workers: int = 1
    threads_per_worker: int | None = None
    bad_lines: int = 0
    failures: list[str] = field(default_factory=list)


def _tokenizer_sample(files: list[Path], documents: int) -> tuple[Iterator[str], dict]:
    """The texts to train a tokenizer on: the first ceil(documents / files) documents of each input file,
    streamed (the same sample on every machine); the dict is filled in with what was read."""
    per_file = max(1, math.ceil(documents / len(files)))
    described = {"documents": 0, "characters": 0, "per_file": per_file, "files": len(files)}

    def texts() -> Iterator[str]:
        for path in files:
            taken = 0
            for item in read_dolma_file(path):
                if isinstance(item, BadLine):
                    continue
                described["documents"] += 1
                described["characters"] += len(item.doc["text"])
                yield item.doc["text"]
                taken += 1
                if taken >= per_file:
                    break

    return texts(), described


def _check_options(
    *,
    tokenizer_path: Path | None,
    train_tokenizer_vocab: int | None,
    tokenizer_sample: int,
    chat: bool,
    workers: int,
    threads_per_worker: int | None,
    max_bad_lines: int | None,
    max_bad_lines_total: int | None,
    shard_index: int,
    num_shards: int,
    tokenizer_only: bool,
) -> None:
    """Refuse an impossible combination of options in one line, before anything is read or written."""
    if (tokenizer_path is None) == (train_tokenizer_vocab is None):
        raise DataError("pass exactly one of a tokenizer (--tokenizer FILE) or a vocab to train (--train-tokenizer N)")
    if chat and tokenizer_path is None:
        raise DataError(
            "--chat data is for fine-tuning a model: pass its tokenizer (--tokenizer FILE), not --train-tokenizer"
        )
    for name, value, least in [
        ("workers", workers, 1),
        ("tokenizer_sample", tokenizer_sample, 1),
        ("num_shards", num_shards, 1),
        ("shard_index", shard_index, 0),
    ]:
        if not isinstance(value, int) or value < least:
            raise DataError(f"{name}={value!r} must be an integer >= {least}")
    for name, value in [("threads_per_worker", threads_per_worker), ("max_bad_lines", max_bad_lines)]:
        if value is not None and (not isinstance(value, int) or value < (1 if name == "threads_per_worker" else 0)):
            raise DataError(f"{name}={value!r} must be a non-negative integer (threads: positive)")
    if max_bad_lines_total is not None and (not isinstance(max_bad_lines_total, int) or max_bad_lines_total < 0):
        raise DataError(f"max_bad_lines_total={max_bad_lines_total!r} must be a non-negative integer")
    if shard_index >= num_shards:
        raise DataError(f"--shard-index {shard_index} must be below --num-shards {num_shards} (0-based)")
    if tokenizer_only and train_tokenizer_vocab is None:
        raise DataError("--tokenizer-only trains the tokenizer of a run: pass --train-tokenizer VOCAB")


def _progress_line(result: PrepareReport, name: str, record: dict, *, seconds: float, remaining: int) -> str:
    """One log line per committed shard, readable in a Slurm log: the shard, its rate, the run's rate, an ETA."""
    rate = record["tokens"] / max(seconds, 1e-9)
    run_rate = result.run_tokens / max(result.seconds, 1e-9)
    eta = result.seconds / result.run_shards * remaining
    bad = f", {record['bad_lines']} bad lines" if record["bad_lines"] else ""
    damaged = " (damaged: tail skipped)" if record["damaged"] else ""
    return (
        f"prepare: [{result.committed}/{result.shards}] {name}: {record['tokens']:,} tokens, "
        f"{record['documents']:,} documents in {seconds:.1f} s ({rate:,.0f} tokens/s){bad}{damaged}; "
        f"this run {run_rate:,.0f} tokens/s, {remaining} shards left here, ETA {eta / 60:.1f} min"
    )


def prepare_job(
    inputs: list[Path],
    out_dir: Path,
    *,
    tokenizer_path: Path | None = None,
    train_tokenizer_vocab: int | None = None,
    tokenizer_sample: int = TOKENIZER_SAMPLE_DOCUMENTS,
    chat: bool = False,
    workers: int = 1,
    threads_per_worker: int | None = None,
    max_bad_lines: int | None = CLI_MAX_BAD_LINES,
    max_bad_lines_total: int | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    tokenizer_only: bool = False,
    resume: bool = True,
    progress: bool = True,
) -> PrepareReport:
    """Tokenize Dolma `inputs` (files or directories) into `out_dir`, shard by shard; see the module docstring.

    With `resume` (the command line), `out_dir` is itself the work directory: committed shards stay through a
    crash or a signal and a re-run with the same plan continues. Without it, the work happens in a temporary
    sibling that becomes `out_dir` only when complete, and a failure leaves nothing.
    `max_bad_lines` (per shard) and `max_bad_lines_total` (over the directory's committed shards) bound the
    skipped lines, None for no bound; a shard over its bound is not committed and the run ends with an error
    once the other shards are done; over the total, it stops at once.
    """
    _check_options(
        tokenizer_path=tokenizer_path,
        train_tokenizer_vocab=train_tokenizer_vocab,
        tokenizer_sample=tokenizer_sample,
        chat=chat,
        workers=workers,
        threads_per_worker=threads_per_worker,
        max_bad_lines=max_bad_lines,
        max_bad_lines_total=max_bad_lines_total,
        shard_index=shard_index,
        num_shards=num_shards,
        tokenizer_only=tokenizer_only,
    )
    out_dir = Path(out_dir)
    files = dolma_files(inputs)
    names = output_names(files)
    plan = job_plan(files, names, tokenizer_spec(tokenizer_path, train_tokenizer_vocab, tokenizer_sample), chat)
    options = {
        "tokenizer_path": tokenizer_path,
        "workers": workers,
        "threads_per_worker": threads_per_worker,
        "max_bad_lines": max_bad_lines,
        "max_bad_lines_total": max_bad_lines_total,
        "progress": progress,
    }
    if not resume:
        with atomic_directory(out_dir, DataError) as tmp:
            open_directory(tmp, plan)
            result = _run(plan, files, tmp, **options, shard_index=0, num_shards=1, tokenizer_only=False)
            shutil.rmtree(tmp / PREPARE_STATE_DIR)  # a complete directory of the all-or-nothing form has no state
        result.out_dir = out_dir
        return result
    created = open_directory(out_dir, plan)
    try:
        return _run(
            plan,
            files,
            out_dir,
            **options,
            shard_index=shard_index,
            num_shards=num_shards,
            tokenizer_only=tokenizer_only,
        )
    except DataError:
        # A run that failed before any shard was committed leaves no directory (a bad first shard, a typo):
        # there is nothing to resume, unless a tokenizer was trained there. An interrupted run keeps its
        # directory, and parts of a multi-node job never remove what the others may be writing.
        trained = tokenizer_path is None and (out_dir / TOKENIZER_FILE).is_file()
        nothing_to_keep = not trained and not shard_records(out_dir / PREPARE_STATE_DIR)
        if created and num_shards == 1 and nothing_to_keep:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _run(
    plan: dict,
    files: list[Path],
    work: Path,
    *,
    tokenizer_path: Path | None,
    workers: int,
    threads_per_worker: int | None,
    max_bad_lines: int | None,
    max_bad_lines_total: int | None,
    shard_index: int,
    num_shards: int,
    tokenizer_only: bool,
    progress: bool,
) -> PrepareReport:
    """The tokenizer, then this part's uncommitted shards, then metadata.json once every shard is committed."""
    state = work / PREPARE_STATE_DIR
    tokenizer = work / TOKENIZER_FILE
    spec = plan["tokenizer"]
    if not tokenizer.is_file():
        if tokenizer_path is not None:
            copy_atomically(tokenizer_path, tokenizer)
        elif num_shards > 1:
            raise DataError(
                f"{num_shards} parts cannot train one tokenizer at once: train it first with the same command "
                "and --tokenizer-only (no --shard-index), or pass --tokenizer FILE"
            )
        else:
            texts, described = _tokenizer_sample(files, spec["sample_documents"])
            trained = state / f".{TOKENIZER_FILE}.trained"
            train_bpe_tokenizer(texts, spec["train_vocab"], trained)
            described["rule"] = (
                f"the first {described['per_file']} documents of each of the {described['files']} input files, "
                "in input order"
            )
            write_atomically(state / SAMPLE_FILE, json.dumps(described, indent=2) + "\n")
            trained.replace(tokenizer)
    records = shard_records(state)
    result = PrepareReport(out_dir=work, metadata=None, shards=len(files), committed=len(records))
    if tokenizer_only:
        return result
    summary = tokenizer_summary(tokenizer)
    dtype = token_dtype(summary["vocab_size"])
    if plan["chat"]:
        (work / LABEL_MASK_DIR).mkdir(exist_ok=True)
    mine = [i for i in range(len(files)) if i % num_shards == shard_index]
    tasks = [
        ShardTask(
            src=files[i],
            out_dir=work,
            name=plan["inputs"][i]["name"],
            tokenizer=tokenizer,
            dtype=dtype.name,
            eos=summary["eos"],
            chat=plan["chat"],
            max_bad_lines=max_bad_lines,
        )
        for i in mine
        if plan["inputs"][i]["name"] not in records
    ]
    remove_temporaries(tasks)  # what a killed run of this part left half-written
    result.workers = min(workers, max(len(tasks), 1))
    result.threads_per_worker = threads_per_worker
    committed_bad = sum(r["bad_lines"] for r in records.values())
    start = time.perf_counter()
    with signals_interrupt():
        try:
            with closing(run_tasks(tasks, workers, threads_per_worker)) as outcomes:
                for task, outcome in outcomes:
                    if isinstance(outcome, DataError):
                        result.failures.append(str(outcome))
                        if progress:
                            print(f"prepare: {task.name} failed: {outcome}", file=sys.stderr, flush=True)
                        continue
                    for line in outcome.pop("bad_line_reports"):
                        print(f"bad line: {line}", file=sys.stderr)
                    bad_in_all = committed_bad + outcome["bad_lines"]
                    if max_bad_lines_total is not None and bad_in_all > max_bad_lines_total:
                        raise DataError(
                            f"{task.src}: {outcome['bad_lines']} more bad lines would make {bad_in_all} in all, "
                            f"over --max-bad-lines-total {max_bad_lines_total}; {len(shard_records(state))} of "
                            f"{len(files)} shards are committed"
                        )
                    seconds = outcome.pop("seconds")
                    commit_shard(task, outcome, state)
                    committed_bad = bad_in_all
                    result.committed += 1
                    result.run_shards += 1
                    result.run_tokens += outcome["tokens"]
                    result.run_documents += outcome["documents"]
                    result.seconds = time.perf_counter() - start
                    if progress:
                        remaining = len(tasks) - result.run_shards - len(result.failures)
                        line = _progress_line(result, task.name, outcome, seconds=seconds, remaining=remaining)
                        print(line, file=sys.stderr, flush=True)
        except BaseException as stopped:
            remove_temporaries(tasks)  # the workers are gone: what they were writing is never committed
            if isinstance(stopped, PrepareInterrupted):
                stopped.message = (
                    f"interrupted by {stopped.message}: {len(shard_records(state))} of {len(files)} shards are "
                    f"committed in {work}; run the same command again to resume"
                )
            raise
    result.seconds = time.perf_counter() - start
    result.bad_lines = committed_bad
    if result.failures:
        committed = len(shard_records(state))
        again = "; fix them (or raise --max-bad-lines) and run the same command again to finish" if committed else ""
        raise DataError(
            f"{len(result.failures)} shard(s) failed, the first: {result.failures[0]}; "
            f"{committed} of {len(files)} shards are committed{again}"
        )
    records = shard_records(state)
    result.committed = len(records)
    if len(records) == len(files):  # every part checks after its commits: the last to commit writes it
        result.metadata = final_metadata(plan, records, summary, dtype, state)
        write_atomically(work / METADATA_FILE, json.dumps(result.metadata, indent=2) + "\n")
    return result


def prepare(
    inputs: list[Path],
    out_dir: Path,
    *,
    tokenizer_path: Path | None = None,
    train_tokenizer_vocab: int | None = None,
    tokenizer_sample: int = TOKENIZER_SAMPLE_DOCUMENTS,
    chat: bool = False,
    workers: int = 1,
    max_bad_lines: int | None = 0,
    max_bad_lines_total: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize Dolma `inputs` (files or directories) into `out_dir`; return the metadata written there.

    Pass `tokenizer_path` to use an existing tokenizer, or `train_tokenizer_vocab` to first train a
    byte-level BPE of that size on a sample of the inputs (`tokenizer_sample` documents). With `chat`, the
    inputs are instruction JSONL (megaolmo.data.chat) and label masks are written too; fine-tuning starts
    from a model, so it takes that model's tokenizer. `out_dir` must be new or empty; it appears only once
    everything is written, and by default (`max_bad_lines=0`) any line that is not a document is an error,
    as a caller handing over its own files expects. `python -m megaolmo.data.prepare` is the resumable form.
    """
    result = prepare_job(
        inputs,
        out_dir,
        tokenizer_path=tokenizer_path,
        train_tokenizer_vocab=train_tokenizer_vocab,
        tokenizer_sample=tokenizer_sample,
        chat=chat,
        workers=workers,
        max_bad_lines=max_bad_lines,
        max_bad_lines_total=max_bad_lines_total,
        resume=False,
        progress=progress,
    )
    return result.metadata


def _limit(text: str) -> int | None:
    """A bad-line limit from the command line: a count, or `none` for no limit."""
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (or none)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _throughput(result: PrepareReport) -> str:
    seconds = max(result.seconds, 1e-9)
    threads = result.threads_per_worker or max(1, available_cores() // result.workers)
    return (
        f"this run: {result.run_shards} shards, {result.run_tokens:,} tokens, {result.run_documents:,} documents in "
        f"{result.seconds:.1f} s wall: {result.run_tokens / seconds:,.0f} tokens/s, "
        f"{result.run_documents / seconds:,.0f} documents/s ({result.workers} workers x {threads} threads)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megaolmo.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", type=Path, help="Dolma files or directories")
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="a new (or empty) directory, or one to resume"
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tokenizer", type=Path, metavar="TOKENIZER.json", help="a Hugging Face tokenizer file")
    which.add_argument("--train-tokenizer", type=int, metavar="VOCAB", help="train a byte-level BPE of VOCAB tokens")
    parser.add_argument(
        "--tokenizer-sample",
        type=int,
        default=TOKENIZER_SAMPLE_DOCUMENTS,
        metavar="DOCS",
        help="train the tokenizer on DOCS documents: the first DOCS/files of each input file "
        f"(default {TOKENIZER_SAMPLE_DOCUMENTS:,})",
    )
    parser.add_argument(
        "--tokenizer-only",
        action="store_true",
        help="only train the tokenizer into DIR (run once before the --num-shards parts)",
    )
    parser.add_argument(
        "--chat", action="store_true", help="inputs are instruction JSONL; also write label masks (assistant turns)"
    )
    parser.add_argument("--workers", type=int, default=1, help="input files tokenized in parallel (processes)")
    parser.add_argument(
        "--threads-per-worker",
        type=int,
        metavar="N",
        help="tokenizer threads per worker (default: the cores this job may use / workers)",
    )
    parser.add_argument(
        "--max-bad-lines",
        type=_limit,
        default=CLI_MAX_BAD_LINES,
        metavar="N",
        help=f"bad lines a shard may skip before it fails (default {CLI_MAX_BAD_LINES}; none: no limit)",
    )
    parser.add_argument(
        "--max-bad-lines-total",
        type=_limit,
        default=None,
        metavar="N",
        help="bad lines all shards together may skip before the run stops (default none)",
    )
    parser.add_argument("--shard-index", type=int, default=0, metavar="I", help="this part's index (0-based)")
    parser.add_argument("--num-shards", type=int, default=1, metavar="N", help="parts the input shards are split in")
    parser.add_argument("--no-progress", action="store_true", help="no per-shard progress lines")
    args = parser.parse_args(argv)
    try:
        result = prepare_job(
            args.inputs,
            args.out,
            tokenizer_path=args.tokenizer,
            train_tokenizer_vocab=args.train_tokenizer,
            tokenizer_sample=args.tokenizer_sample,
            chat=args.chat,
            workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            max_bad_lines=args.max_bad_lines,
            max_bad_lines_total=args.max_bad_lines_total,
            shard_index=args.shard_index,
            num_shards=args.num_shards,
            tokenizer_only=args.tokenizer_only,
            progress=not args.no_progress,
        )
    except MegaolmoError as err:
        return report(err)
    except PrepareInterrupted as interrupted:
        print(f"error: {interrupted.message}", file=sys.stderr)
        return 128 + interrupted.signum
    if args.tokenizer_only:
        print(f"wrote {args.out / TOKENIZER_FILE}; now run the same command without --tokenizer-only")
        return 0
    meta = result.metadata
    if meta is None:
        print(_throughput(result))
        print(
            f"part {args.shard_index} of {args.num_shards} done: {result.committed} of {result.shards} shards of "
            f"{args.out} are committed; metadata.json is written by the part that commits the last one "
            "(or run any part's command again once all are done)"
        )
        return 0
    print(
        f"wrote {args.out}: {meta['tokens']} tokens ({meta['dtype']}) in {meta['documents']} documents "
        f"from {len(meta['files'])} files" + (f", {meta['bad_lines']} bad lines skipped" if meta["bad_lines"] else "")
    )
    print(_throughput(result))
    if args.chat:
        print(
            f"{meta['targets']} of the tokens are targets; train with data.paths=[{args.out}] "
            f"data.label_mask_paths=[{args.out / LABEL_MASK_DIR}]"
        )
    return 0


if __name__ == "__main__":
    # Run the copy of this module that `megaolmo.data` imported, not this `__main__` copy, so there is one
    # set of its functions and classes whichever way the module was started (what worker processes unpickle
    # lives in megaolmo.data.tokenize_shard).
    sys.exit(sys.modules["megaolmo.data.prepare"].main())
