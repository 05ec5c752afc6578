"""Tokenize Dolma documents (or, with --chat, instruction data) into OLMo-format token memmaps.

    python -m megaolmo.data.prepare INPUT... --out DIR (--tokenizer TOKENIZER.json | --train-tokenizer VOCAB)
                                    [--chat] [--workers N] [--no-progress]

Every input file becomes `<out>/<input stem>.npy`: raw token ids (no header, despite the suffix),
uint16 when the vocab fits, else uint32; each document tokenized without BOS and followed by EOS,
all concatenated. That is OLMo's layout, so OLMo's own memmaps and these read the same way.
`<out>/metadata.json` records the dtype, the tokenizer's fingerprint and, per file and per source,
the tokens, documents and UTF-8 bytes (bits per byte needs the bytes); the tokenizer is copied to
`<out>/tokenizer.json`. Memory stays constant: documents are tokenized in batches and appended.
Special-token strings inside a document are tokenized as plain text (OLMo's own script would turn
a literal `<|endoftext|>` into EOS), so EOS ids mark document ends and nothing else.
With --chat the inputs are instruction JSONL files (megaolmo.data.chat): each conversation is rendered
with open-instruct's tulu template and packed the same way, and a label mask per token file
(`<out>/label_masks/<name>.npy`, np.bool_, True on the assistant turns) is written beside it; the
metadata records it (`label_masks`, and the targets per file).
A bad input stops with one `error:` line, exit code 2, and no output directory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from megaolmo.atomic import atomic_directory, refuse_existing
from megaolmo.data.chat import LABEL_MASK_DIR, tokenize_chat_file
from megaolmo.data.dolma import dolma_files, dolma_stem, iter_documents
from megaolmo.data.metadata import FORMAT, FORMAT_VERSION, METADATA_FILE, TOKENIZER_FILE, token_dtype
from megaolmo.data.tokenizer import load_tokenizer, tokenizer_summary, train_bpe_tokenizer
from megaolmo.errors import DataError, MegaolmoError, report

BATCH_DOCUMENTS = 1024  # documents per encode_batch call
BATCH_CHARS = 8 << 20  # ... or fewer when they are long: bounds memory whatever the documents' size


def _batches(docs: Iterable[dict]) -> Iterator[list[dict]]:
    """Group documents into batches bounded in count and in characters."""
    batch: list[dict] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc["text"])
        if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _utf8_bytes(doc: dict, src: Path) -> int:
    try:
        return len(doc["text"].encode("utf-8"))
    except UnicodeEncodeError:
        raise DataError(f"{src}: document {doc.get('id')!r} has text that is not valid Unicode (a lone surrogate)")


def tokenize_file(
    src: Path, dst: Path, tokenizer_path: Path, dtype: str, eos: int, on_batch: Callable[[int, int], None] | None = None
) -> dict:
    """Tokenize one Dolma file into the memmap `dst`; return its tokens, documents and per-source counts.

    A module-level function so a process pool can run it; it loads the tokenizer itself.
    """
    tokenizer = load_tokenizer(tokenizer_path)
    # A special token's string inside a document ("<|endoftext|>" in a web page about GPT) is text: the
    # only EOS ids in the stream are the document ends, and decoding gives the document back exactly.
    tokenizer.encode_special_tokens = True
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: faster
    sources: dict[str, dict[str, int]] = {}
    total_tokens = total_docs = 0
    with open(dst, "wb") as out:
        for batch in _batches(iter_documents([src])):
            encodings = encode([doc["text"] for doc in batch], add_special_tokens=False)
            ids: list[int] = []
            for doc, encoding in zip(batch, encodings):
                ids.extend(encoding.ids)
                ids.append(eos)
                stats = sources.setdefault(str(doc["source"]), {"tokens": 0, "documents": 0, "bytes": 0})
                stats["tokens"] += len(encoding.ids) + 1
                stats["documents"] += 1
                stats["bytes"] += _utf8_bytes(doc, src)
            np.asarray(ids, dtype=dtype).tofile(out)
            total_tokens += len(ids)
            total_docs += len(batch)
            if on_batch is not None:
                on_batch(len(batch), len(ids))
    return {
        "input": str(src),
        "tokens": total_tokens,
        "documents": total_docs,
        "bytes": sum(s["bytes"] for s in sources.values()),
        "sources": dict(sorted(sources.items())),
    }


def _output_names(files: list[Path]) -> list[str]:
    """`<stem>.npy` per input file; two inputs with one stem would overwrite each other, so refuse them."""
    seen: dict[str, Path] = {}
    for path in files:
        name = dolma_stem(path) + ".npy"
        if name in seen:
            raise DataError(f"inputs {seen[name]} and {path} would both write {name}; rename one of them")
        seen[name] = path
    return list(seen)


def _progress_bar(progress: bool, **kwargs):
    """A tqdm bar, silent when progress is off (on every rank but the first, in tests)."""
    from tqdm import tqdm

    return tqdm(disable=not progress, **kwargs)


def _tokenize_all(
    jobs: list[tuple[Path, Path]],
    tokenize: Callable[..., dict],  # tokenize_file or chat.tokenize_chat_file
    tokenizer: Path,
    dtype: str,
    eos: int,
    workers: int,
    progress: bool,
) -> list[dict]:
    """Tokenize every (input, output) pair, serially or over a process pool; results in input order."""
    tokens = 0
    if workers == 1 or len(jobs) == 1:
        bar = _progress_bar(progress, desc="tokenizing", unit="doc")

        def on_batch(docs: int, n_tokens: int) -> None:
            nonlocal tokens
            tokens += n_tokens
            bar.update(docs)
            bar.set_postfix(tokens=tokens)

        try:
            return [tokenize(src, dst, tokenizer, dtype, eos, on_batch) for src, dst in jobs]
        finally:
            bar.close()
    # spawn, not fork: a forked child of a process that already ran tokenizers' thread pool runs single-threaded
    context = multiprocessing.get_context("spawn")
    bar = _progress_bar(progress, desc="tokenizing", unit="file", total=len(jobs))
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = [pool.submit(tokenize, src, dst, tokenizer, dtype, eos) for src, dst in jobs]
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    result = future.result()  # raises the worker's DataError
                    tokens += result["tokens"]
                    bar.update(1)
                    bar.set_postfix(tokens=tokens)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            bar.close()
        return [future.result() for future in futures]


def prepare(
    inputs: list[Path],
    out_dir: Path,
    *,
    tokenizer_path: Path | None = None,
    train_tokenizer_vocab: int | None = None,
    chat: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Tokenize Dolma `inputs` (files or directories) into `out_dir`; return the metadata written there.

    Pass `tokenizer_path` to use an existing tokenizer, or `train_tokenizer_vocab` to first train a
    byte-level BPE of that size on the inputs' texts. With `chat`, the inputs are instruction JSONL
    (megaolmo.data.chat) and label masks are written too; fine-tuning starts from a model, so it takes
    that model's tokenizer. `out_dir` must be new or empty; it appears only once everything is written.
    """
    if (tokenizer_path is None) == (train_tokenizer_vocab is None):
        raise DataError("pass exactly one of a tokenizer (--tokenizer FILE) or a vocab to train (--train-tokenizer N)")
    if chat and tokenizer_path is None:
        raise DataError(
            "--chat data is for fine-tuning a model: pass its tokenizer (--tokenizer FILE), not --train-tokenizer"
        )
    if not isinstance(workers, int) or workers < 1:
        raise DataError(f"workers={workers!r} must be a positive integer")
    out_dir = Path(out_dir)
    refuse_existing(Path(out_dir), DataError)
    files = dolma_files(inputs)
    names = _output_names(files)
    if tokenizer_path is not None:
        tokenizer_summary(tokenizer_path)  # fail on a bad tokenizer before any work
    with atomic_directory(out_dir, DataError) as tmp:
        tokenizer = tmp / TOKENIZER_FILE
        if train_tokenizer_vocab is not None:
            train_bpe_tokenizer((doc["text"] for doc in iter_documents(files)), train_tokenizer_vocab, tokenizer)
        else:
            shutil.copyfile(tokenizer_path, tokenizer)
        summary = tokenizer_summary(tokenizer)
        dtype = token_dtype(summary["vocab_size"])
        jobs = [(src, tmp / name) for src, name in zip(files, names)]
        if chat:
            (tmp / LABEL_MASK_DIR).mkdir()
        tokenize = tokenize_chat_file if chat else tokenize_file
        results = _tokenize_all(jobs, tokenize, tokenizer, dtype.name, summary["eos"], workers, progress)
        per_file = dict(zip(names, results))
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
        }
        if chat:  # np.bool_ masks with the token files' names, in this subdirectory
            metadata.update(label_masks=LABEL_MASK_DIR, targets=sum(r["targets"] for r in results))
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megaolmo.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", type=Path, help="Dolma files or directories")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="a new (or empty) directory")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tokenizer", type=Path, metavar="TOKENIZER.json", help="a Hugging Face tokenizer file")
    which.add_argument("--train-tokenizer", type=int, metavar="VOCAB", help="train a byte-level BPE of VOCAB tokens")
    parser.add_argument(
        "--chat", action="store_true", help="inputs are instruction JSONL; also write label masks (assistant turns)"
    )
    parser.add_argument("--workers", type=int, default=1, help="input files tokenized in parallel (processes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        meta = prepare(
            args.inputs,
            args.out,
            tokenizer_path=args.tokenizer,
            train_tokenizer_vocab=args.train_tokenizer,
            chat=args.chat,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except MegaolmoError as err:
        return report(err)
    print(
        f"wrote {args.out}: {meta['tokens']} tokens ({meta['dtype']}) in {meta['documents']} documents "
        f"from {len(meta['files'])} files"
    )
    if args.chat:
        print(
            f"{meta['targets']} of the tokens are targets; train with data.paths=[{args.out}] "
            f"data.label_mask_paths=[{args.out / LABEL_MASK_DIR}]"
        )
    return 0


if __name__ == "__main__":
    # Run the copy of this module that `megaolmo.data` imported, not this `__main__` copy, so there is one
    # set of functions (the ones worker processes unpickle) whichever way the module was started.
    sys.exit(sys.modules["megaolmo.data.prepare"].main())
