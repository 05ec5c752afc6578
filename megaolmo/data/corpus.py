"""The built-in corpus: the Python standard library's own source, tokenized once and cached.

It needs no download, exists on every machine that runs megaolmo, and is big enough (~10 MB of
text, ~3M tokens) for a tiny model to learn something measurable. Each `.py` file is one Dolma
document whose source is its top-level module or package (`json`, `asyncio`, `os`), so evaluation
can report per-source numbers. A file goes to the held-out split when sha256(relative path) % 50
== 0 (about 2%): a rule of the path alone, stable across machines and Python patch releases.

Layout of the cache folder (`$MEGAOLMO_CACHE` or ~/.cache/megaolmo, then stdlib-py3XX-vNNNN):

    dolma/train.jsonl.gz, dolma/valid/<source>.jsonl.gz     the documents
    train/train.npy, metadata.json, tokenizer.json           a BPE trained on the train split only
    valid/<source>.npy, metadata.json, tokenizer.json        one memmap per source, same tokenizer
    COMPLETE                                                  written last: the cache is usable

The folder is built under a temporary name and renamed when complete, under an exclusive lock, so
concurrent ranks prepare it once while the others wait, and a crash never leaves a half cache.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megaolmo.data.metadata import TOKENIZER_FILE, read_metadata
from megaolmo.data.prepare import prepare
from megaolmo.errors import DataError

CORPUS_VERSION = 1  # bump when the selection or the layout changes, so old caches are not reused
SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
MAX_FILE_BYTES = 200_000  # the two bigger files are generated tables (pydoc topics, _pydecimal)
VALID_MODULUS = 50
MARKER = "COMPLETE"


@dataclass
class BuiltinCorpus:
    """Where the prepared built-in corpus lives, and what it holds."""

    root: Path  # the cache folder of this Python version and vocab
    train_paths: list[Path]  # token memmaps of the train split
    valid_paths: list[Path]  # one token memmap per source of the held-out split
    tokenizer_path: Path  # the BPE trained on the train split
    train_dir: Path  # metadata dir (metadata.json) of the train memmaps
    valid_dir: Path  # metadata dir of the valid memmaps
    documents_dir: Path  # the Dolma documents the memmaps were made from
    summary: dict = field(default_factory=dict)  # tokens, documents, bytes and seconds of each split

    @property
    def metadata_dir(self) -> Path:
        """The train split's metadata dir (the one to check a model's tokenizer against)."""
        return self.train_dir

    @property
    def valid_sources(self) -> dict[str, Path]:
        """Source name -> its held-out memmap."""
        return {path.stem: path for path in self.valid_paths}


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's own .py files, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIPPED_FOLDERS for part in rel.parts[:-1]) or not path.is_file():
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        files.append((rel.as_posix(), path))
    return sorted(files)


def is_valid(relative_path: str) -> bool:
    """The held-out rule: about one file in 50, chosen by a hash of its path."""
    return int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % VALID_MODULUS == 0


def source_of(relative_path: str) -> str:
    """Top-level package or module: `json/decoder.py` -> json, `os.py` -> os."""
    first = relative_path.split("/")[0]
    return first.removesuffix(".py")


def stdlib_documents() -> Iterator[dict]:
    """The standard library as Dolma documents; files that are not UTF-8 are skipped."""
    for rel, path in stdlib_files():
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield {"id": rel, "text": text, "source": source_of(rel)}


def _write_jsonl_gz(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same documents give the same bytes on every machine
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=1) as gz:
        for doc in docs:
            gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))


def _build(root: Path, vocab_size: int, progress: bool) -> dict:
    """Write the documents, train the tokenizer and prepare both splits into `root` (a fresh folder)."""
    train: list[dict] = []
    valid: dict[str, list[dict]] = {}
    for doc in stdlib_documents():
        if is_valid(doc["id"]):
            valid.setdefault(doc["source"], []).append(doc)
        else:
            train.append(doc)
    if not train or not valid:
        raise DataError(f"the standard library at {sysconfig.get_paths()['stdlib']} has too few .py files")
    documents = root / "dolma"
    _write_jsonl_gz(documents / "train.jsonl.gz", train)
    for source, docs in valid.items():
        _write_jsonl_gz(documents / "valid" / f"{source}.jsonl.gz", docs)
    del train, valid
    summary = {}
    start = time.perf_counter()
    meta = prepare([documents / "train.jsonl.gz"], root / "train", train_tokenizer_vocab=vocab_size, progress=progress)
    summary["train"] = {k: meta[k] for k in ("tokens", "documents", "bytes")} | {
        "seconds": round(time.perf_counter() - start, 2)
    }
    start = time.perf_counter()
    meta = prepare(
        [documents / "valid"], root / "valid", tokenizer_path=root / "train" / TOKENIZER_FILE, progress=progress
    )
    summary["valid"] = {k: meta[k] for k in ("tokens", "documents", "bytes")} | {
        "seconds": round(time.perf_counter() - start, 2),
        "sources": meta["sources"],
    }
    return summary


def _load(root: Path) -> BuiltinCorpus:
    """The corpus described by a complete cache folder."""
    train_meta = read_metadata(root / "train")
    valid_meta = read_metadata(root / "valid")
    if train_meta is None or valid_meta is None:
        raise DataError(f"built-in corpus cache {root} is damaged; delete it and run again")
    summary = json.loads((root / MARKER).read_text())
    return BuiltinCorpus(
        root=root,
        train_paths=[root / "train" / name for name in train_meta["files"]],
        valid_paths=[root / "valid" / name for name in valid_meta["files"]],
        tokenizer_path=root / "train" / TOKENIZER_FILE,
        train_dir=root / "train",
        valid_dir=root / "valid",
        documents_dir=root / "dolma",
        summary=summary,
    )


def _complete(root: Path) -> bool:
    """Whether `root` holds a finished cache of this corpus version (its marker is written last)."""
    try:
        return json.loads((root / MARKER).read_text()).get("version") == CORPUS_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGAOLMO_CACHE") or Path.home() / ".cache" / "megaolmo")


def builtin_corpus(cache_dir: Path | None = None, vocab_size: int = 4096, progress: bool = True) -> BuiltinCorpus:
    """The built-in corpus, prepared on first use (~15 s on 2 cores) and read from the cache afterwards.

    `cache_dir` is the cache root (default `$MEGAOLMO_CACHE` or ~/.cache/megaolmo); the corpus lives
    in its subfolder `stdlib-py{major}{minor}-v{vocab_size}`. Safe to call from every rank at once.
    """
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = base / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-v{vocab_size}"
    if _complete(root):
        return _load(root)
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first caller prepares; the others wait here, then read its cache
        if not _complete(root):
            shutil.rmtree(root, ignore_errors=True)  # no marker, or an older version: rebuild
            for stale in base.glob(f".{root.name}.tmp-*"):  # left by a killed build; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            tmp = base / f".{root.name}.tmp-{os.getpid()}"
            tmp.mkdir()
            try:
                summary = {"version": CORPUS_VERSION, "python": sys.version.split()[0], "vocab_size": vocab_size}
                summary |= _build(tmp, vocab_size, progress)
                (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
                tmp.rename(root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return _load(root)
