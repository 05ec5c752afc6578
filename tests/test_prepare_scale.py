"""`python -m megaolmo.data.prepare` as a Dolma-sized job: every Dolma suffix, bad lines and damaged shards
skipped and counted, shard-by-shard commits that a re-run resumes (byte for byte), SIGTERM that leaves no
worker behind, a job split over Slurm array tasks, a tokenizer trained on a bounded sample, group runs.

Tiny tokenizers and a few hundred documents; the signal test starts one prepare subprocess with 2 workers.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import docs, small_tokenizer, write_dolma

from megaolmo.data import DataError, MemmapDataset, iter_documents, load_tokenizer, prepare, read_metadata
from megaolmo.data.prepare import main as prepare_main
from megaolmo.data.tokenizer import tokenizer_fingerprint, train_bpe_tokenizer

WORDS = ["the", "of", "and", "to", "in", "data", "model", "token", "shard", "source", "web", "code", "paper", "book"]


def sentences(i: int, words: int = 40) -> str:
    """A deterministic English-like text, different for each `i`."""
    return " ".join(WORDS[(i * 7 + k * k) % len(WORDS)] for k in range(words)) + f" ({i})."


def write_zst(path: Path, documents: list[dict], per_frame: int = 10) -> Path:
    """A zstd Dolma file of concatenated frames, `per_frame` documents each (as streaming writers make them)."""
    import zstandard  # here, not at the top: collecting the GPU tests on a node without it must not fail

    compressor = zstandard.ZstdCompressor()
    lines = [json.dumps(doc) + "\n" for doc in documents]
    frames = [compressor.compress("".join(lines[i : i + per_frame]).encode()) for i in range(0, len(lines), per_frame)]
    path.write_bytes(b"".join(frames))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def shard_dir(root: Path, shards: int = 4, per_shard: int = 30) -> Path:
    """`shards` gzipped Dolma shards of two sources."""
    for s in range(shards):
        texts = [sentences(s * per_shard + i) for i in range(per_shard)]
        write_dolma(root / f"part-{s}.json.gz", docs(texts, source="web" if s % 2 else "code", prefix=f"p{s}"))
    return root


def file_bytes(directory: Path) -> dict[str, bytes]:
    """The token files, label masks and metadata.json of a prepared directory (what must match byte for byte)."""
    names = [*directory.glob("*.npy"), *directory.glob("label_masks/*.npy"), directory / "metadata.json"]
    return {str(p.relative_to(directory)): p.read_bytes() for p in names}


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megaolmo.data.prepare", *map(str, args), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ---------------------------------------------------------------------------------------------
# Reading every Dolma suffix


def test_every_dolma_suffix_is_read_and_other_files_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "mixed"
    write_dolma(root / "a.json.gz", docs(["a"], source="s"))
    write_dolma(root / "b.jsonl.gz", docs(["b"], source="s"))
    write_dolma(root / "c.json", docs(["c"], source="s"))
    write_dolma(root / "d.jsonl", docs(["d"], source="s"))
    write_zst(root / "e.json.zst", docs(["e"], source="s"))
    write_zst(root / "f.jsonl.zst", docs(["f", "g"], source="s"))
    (root / "README.md").write_text("not data")
    assert [d["text"] for d in iter_documents([root])] == list("abcdefg")
    assert "ignoring 1 file(s) without a Dolma suffix" in capsys.readouterr().err
    meta = prepare([root], tmp_path / "out", tokenizer_path=small_tokenizer(tmp_path / "t.json"), progress=False)
    assert meta["documents"] == 7 and len(meta["files"]) == 6
    err = capsys.readouterr().err
    assert "README.md" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Bad lines and damaged shards


BAD_LINES = [
    "{not json",
    '{"id": "no text"}',
    '{"text": 3}',
    '{"text": "lone \\ud800 surrogate"}',
    "[1, 2]",
]


def test_bad_lines_are_skipped_counted_and_named(
    tmp_path: Path, tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    good = [json.dumps({"text": sentences(i), "source": "web"}) for i in range(3)]
    shard = tmp_path / "in" / "bad.jsonl"
    shard.parent.mkdir()
    shard.write_text("\n".join([good[0], *BAD_LINES, good[1], good[2]]) + "\n")
    write_dolma(tmp_path / "in" / "clean.jsonl", docs([sentences(9)], source="web"))
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"text": "lone \\ud800"}\n')
    with pytest.raises(DataError, match=r"surrogate\.jsonl:1: .*not valid Unicode"):  # one line, not a TypeError
        list(iter_documents([surrogate]))
    out = tmp_path / "out"
    assert prepare_main([str(tmp_path / "in"), "--out", str(out), "--tokenizer", str(tokenizer), "--no-progress"]) == 0
    err = capsys.readouterr().err
    for number in range(2, 2 + len(BAD_LINES)):
        assert f"bad line: {shard}:{number}: " in err
    meta = read_metadata(out)
    assert meta["files"]["bad.npy"]["bad_lines"] == len(BAD_LINES) and meta["files"]["clean.npy"]["bad_lines"] == 0
    assert meta["bad_lines"] == len(BAD_LINES) and meta["files"]["bad.npy"]["documents"] == 3
    # per-shard limit: the shard over it is not committed and the run fails in one line; the rest is kept
    out = tmp_path / "strict"
    args = [str(tmp_path / "in"), "--out", str(out), "--tokenizer", str(tokenizer), "--no-progress"]
    assert prepare_main([*args, "--max-bad-lines", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: 1 shard(s) failed") and f"{shard}:4: " in err[-1], err
    assert "over the limit of 2 a shard (--max-bad-lines)" in err[-1] and "1 of 2 shards are committed" in err[-1]
    assert (out / "clean.npy").is_file() and not (out / "bad.npy").exists()
    assert prepare_main([*args, "--max-bad-lines", "none", "--max-bad-lines-total", "4"]) == 2  # the total limit
    assert "over --max-bad-lines-total 4" in capsys.readouterr().err
    assert prepare_main([*args, "--max-bad-lines", "5"]) == 0  # limits are no part of the plan: this resumes
    assert file_bytes(out) == file_bytes(tmp_path / "out")


def test_a_truncated_shard_keeps_its_documents_before_the_damage(tmp_path: Path, tokenizer: Path) -> None:
    texts = [" ".join(str((i * 7919 + k * 104729) % 100_003) for k in range(40)) for i in range(120)]  # no repeats
    whole = write_dolma(tmp_path / "whole" / "s.json.gz", docs(texts, source="web"))
    cut = tmp_path / "in" / "s.json.gz"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    zst = write_zst(tmp_path / "whole.jsonl.zst", docs(texts, source="web"))
    (tmp_path / "in" / "z.jsonl.zst").write_bytes(zst.read_bytes()[: zst.stat().st_size // 2])
    args = ["--tokenizer", str(tokenizer), "--no-progress"]
    assert prepare_main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), *args]) == 0
    meta = read_metadata(tmp_path / "out")
    assert meta["damaged_files"] == ["s.npy", "z.npy"]
    tk = load_tokenizer(tokenizer)
    for name, kind in [("s.npy", "gzip"), ("z.npy", "zstd")]:
        record = meta["files"][name]
        kept = record["damaged"]["last_good_line"]
        assert 0 < kept < len(texts) and record["documents"] == kept and record["bad_lines"] == 1
        assert f"corrupt {kind} file (the {kind} data ends early" in record["damaged"]["reason"]
        expected = sum(len(tk.encode(t, add_special_tokens=False).ids) + 1 for t in texts[:kept])
        assert record["tokens"] == expected
    assert prepare_main([str(tmp_path / "in"), "--out", str(tmp_path / "again"), *args]) == 0
    assert file_bytes(tmp_path / "again") == file_bytes(tmp_path / "out")  # the same documents kept every time
    with pytest.raises(DataError, match=r"s\.json\.gz: corrupt gzip file \(the gzip data ends early"):
        prepare([cut], tmp_path / "strict", tokenizer_path=tokenizer, progress=False)  # the API is strict


# ---------------------------------------------------------------------------------------------
# Resuming, plans, the incomplete directory


def test_parts_of_an_array_job_make_one_jobs_output(
    tmp_path: Path, tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs = shard_dir(tmp_path / "in", shards=5, per_shard=10)
    prepare([inputs], tmp_path / "one", tokenizer_path=tokenizer, progress=False)
    out = tmp_path / "parts"
    common = [str(inputs), "--out", str(out), "--tokenizer", str(tokenizer), "--num-shards", "3"]
    assert prepare_main([*common, "--shard-index", "1"]) == 0  # shards 1 and 4, with progress lines
    lines = capsys.readouterr()
    assert re.search(
        r"^prepare: \[1/5\] part-1\.npy: [\d,]+ tokens, 10 documents in .* tokens/s\); this run ", lines.err
    )
    assert re.search(r"prepare: \[2/5\] part-4\.npy: .* 0 shards left here, ETA 0\.0 min$", lines.err, re.MULTILINE)
    assert re.search(r"this run: 2 shards, [\d,]+ tokens, 20 documents in .* tokens/s, .* documents/s", lines.out)
    common.append("--no-progress")
    with pytest.raises(DataError, match=r"still being prepared \(2 of 5 shards committed\); run the same prepare"):
        read_metadata(out)
    with pytest.raises(DataError, match="still being prepared"):
        MemmapDataset([out], seq_len=4)  # what training calls
    assert prepare_main([*common, "--shard-index", "2"]) == 0
    assert not (out / "metadata.json").exists()
    assert prepare_main([*common, "--shard-index", "0"]) == 0  # commits the last shard: writes metadata.json
    assert file_bytes(out) == file_bytes(tmp_path / "one")
    assert read_metadata(out) == json.loads((tmp_path / "one" / "metadata.json").read_text())
    assert prepare_main([*common, "--shard-index", "0"]) == 2  # complete: refused as before


def test_a_resume_under_another_plan_is_refused(tmp_path: Path, tokenizer: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = shard_dir(tmp_path / "in", shards=2, per_shard=5)
    out = tmp_path / "out"
    base = [str(inputs), "--out", str(out), "--no-progress", "--num-shards", "2", "--shard-index", "0"]
    assert prepare_main([*base, "--tokenizer", str(tokenizer)]) == 0
    other = small_tokenizer(tmp_path / "other.json", vocab_size=290)
    assert prepare_main([*base, "--tokenizer", str(other)]) == 2
    assert "being prepared under another plan: it was started with tokenizer" in capsys.readouterr().err
    write_dolma(inputs / "part-9.json.gz", docs(["more"]))
    assert prepare_main([*base, "--tokenizer", str(tokenizer)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it was started on 2 input files, this command gives 3" in err
    (inputs / "part-9.json.gz").unlink()
    assert prepare_main([*base, "--tokenizer", str(tokenizer), "--chat"]) == 2
    assert "chat=False, this command gives chat=True" in capsys.readouterr().err


def test_the_tokenizer_is_trained_once_on_a_bounded_sample(tmp_path: Path) -> None:
    inputs = shard_dir(tmp_path / "in", shards=4, per_shard=30)
    out = tmp_path / "out"
    common = [str(inputs), "--out", str(out), "--train-tokenizer", "300", "--tokenizer-sample", "20", "--no-progress"]
    with pytest.raises(SystemExit):  # argparse: --train-tokenizer and --tokenizer together
        prepare_main([*common, "--tokenizer", "x.json"])
    assert prepare_main([*common, "--num-shards", "2", "--shard-index", "0"]) == 2  # n parts cannot train one
    assert prepare_main([*common, "--tokenizer-only"]) == 0
    assert [p.name for p in out.glob("*.npy")] == []
    assert prepare_main([*common, "--num-shards", "2", "--shard-index", "1"]) == 0
    assert prepare_main([*common, "--num-shards", "2", "--shard-index", "0"]) == 0
    meta = read_metadata(out)
    assert meta["tokenizer_sample"] == {
        "documents": 20,
        "characters": meta["tokenizer_sample"]["characters"],
        "per_file": 5,
        "files": 4,
        "rule": "the first 5 documents of each of the 4 input files, in input order",
    }
    sample = [sentences(s * 30 + i) for s in range(4) for i in range(5)]
    assert meta["tokenizer_sample"]["characters"] == sum(map(len, sample))
    train_bpe_tokenizer(sample, 300, tmp_path / "expected.json")
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tmp_path / "expected.json")
    whole = prepare([inputs], tmp_path / "whole", train_tokenizer_vocab=300, tokenizer_sample=20, progress=False)
    assert whole == meta


def test_group_runs_follow_the_documents_in_token_order(tmp_path: Path, tokenizer: Path) -> None:
    mixed = [
        {"text": "a b", "source": "wiki"},
        {"text": "c", "source": "wiki"},
        {"text": "d e f", "source": "paloma", "metadata": json.dumps({"subdomain": "m2d2"})},
        {"text": "g", "source": "wiki"},
    ]
    write_dolma(tmp_path / "in" / "mixed.jsonl", mixed)
    write_dolma(tmp_path / "in" / "one.jsonl", docs(["x", "y"], source="web"))
    meta = prepare([tmp_path / "in"], tmp_path / "out", tokenizer_path=tokenizer, progress=False)
    tk = load_tokenizer(tokenizer)
    sizes = [len(tk.encode(d["text"], add_special_tokens=False).ids) + 1 for d in mixed]
    ends = np.cumsum(sizes).tolist()
    assert meta["files"]["mixed.npy"]["groups"] == [
        ["wiki", 0, ends[1]],
        ["paloma/m2d2", ends[1], ends[2]],
        ["wiki", ends[2], ends[3]],
    ]
    assert meta["files"]["one.npy"]["groups"] == [["web", 0, meta["files"]["one.npy"]["tokens"]]]


# ---------------------------------------------------------------------------------------------
# SIGTERM: no orphaned worker, only committed shards left, a re-run resumes to the same bytes


def children_of(pid: int) -> set[int]:
    """The live child processes of `pid` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_the_workers_and_a_rerun_resumes(tmp_path: Path, tokenizer: Path) -> None:
    inputs = tmp_path / "in"
    for s in range(12):  # plain JSON lines: quick to write, about 0.1 s each to tokenize
        write_dolma(inputs / f"s{s}.jsonl", docs([sentences(s * 1000 + i, words=300) for i in range(100)], "web"))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "megaolmo.data.prepare", str(inputs), "--out", str(out)]
    command += ["--tokenizer", str(tokenizer), "--workers", "2"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: set[int] = set()
    deadline = time.monotonic() + 90
    while not list((out / "prepare" / "shards").glob("*.json")) and time.monotonic() < deadline:
        workers |= children_of(job.pid)
        time.sleep(0.02)
    workers |= children_of(job.pid)
    assert job.poll() is None, job.communicate()
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted by SIGTERM: ") and "run the same command again to resume" in last
    committed = sorted(p.name.removesuffix(".json") for p in (out / "prepare" / "shards").glob("*.json"))
    assert 1 <= len(committed) < 12 and f"{len(committed)} of 12 shards are committed" in last
    assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
    gone_by = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < gone_by:
        time.sleep(0.05)
    assert not [pid for pid in workers if alive(pid)], "worker processes outlived the interrupted prepare"
    assert sorted(p.name for p in out.glob("*.npy")) == committed  # committed shards only, no temporaries
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert prepare_main([str(inputs), "--out", str(out), "--tokenizer", str(tokenizer), "--no-progress"]) == 0
    prepare([inputs], tmp_path / "whole", tokenizer_path=tokenizer, progress=False)
    assert file_bytes(out) == file_bytes(tmp_path / "whole")


def test_gzip_members_and_padding_read_like_gzip(tmp_path: Path) -> None:
    """`cat a.gz b.gz` is one valid gzip file; so is one padded with zeros."""
    first = gzip.compress(b'{"text": "a"}\n', mtime=0)
    second = gzip.compress(b'{"text": "b"}\n{"text": "c"}', mtime=0)
    (tmp_path / "cat.json.gz").write_bytes(first + second + b"\0" * 16)
    assert [d["text"] for d in iter_documents([tmp_path / "cat.json.gz"])] == ["a", "b", "c"]


def test_each_worker_gets_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool worker sizes the tokenizers' Rayon pool before it loads a tokenizer, and leaves Ctrl-C to the parent."""
    from megaolmo.data import tokenize_shard

    for name in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(name, raising=False)
    previous = signal.getsignal(signal.SIGINT)
    try:
        tokenize_shard.init_worker(3)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert os.environ["RAYON_NUM_THREADS"] == os.environ["RAYON_RS_NUM_CPUS"] == "3"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    tokenize_shard.set_tokenizer_threads(1)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert tokenize_shard.available_cores() == len(os.sched_getaffinity(0))
