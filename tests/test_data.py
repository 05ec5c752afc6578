"""The data pipeline: Dolma reading, BPE tokenizers, prepare (and its CLI), memmap instances, global batches,
compatibility checks and the built-in corpus.

Everything but the built-in corpus uses tiny fixtures written by the tests; the corpus is prepared
once per session into a temporary cache (about 10 s on 2 cores).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import TEXTS, big_vocab_tokenizer, decode_documents, docs, small_tokenizer, write_dolma

from megaolmo.data import (
    DataError,
    GlobalBatches,
    MemmapDataset,
    build_order,
    builtin_corpus,
    check_compatible,
    eos_id,
    global_order,
    iter_documents,
    load_tokenizer,
    open_order,
    prepare,
    read_metadata,
    token_dtype,
    tokenizer_fingerprint,
)
from megaolmo.data.corpus import is_valid

corpus_module = importlib.import_module("megaolmo.data.corpus")
order_module = importlib.import_module("megaolmo.data.order")
prepare_module = importlib.import_module("megaolmo.data.prepare")  # the package re-exports prepare(), shadowing it
tokenize_shard_module = importlib.import_module("megaolmo.data.tokenize_shard")

# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture
def dolma_dir(tmp_path: Path) -> Path:
    """Two Dolma files of two formats; one without "source" fields."""
    directory = tmp_path / "dolma"
    write_dolma(directory / "a.json.gz", docs(TEXTS[:3], source="web", prefix="a"))
    write_dolma(directory / "b.jsonl", docs(TEXTS[3:], prefix="b"))
    return directory


def olmo_memmap(path: Path, n_tokens: int, dtype: str = "uint16") -> np.ndarray:
    """A memmap as OLMo writes it: raw token ids, no header, EOS-separated documents."""
    tokens = (np.arange(n_tokens) % 50).astype(dtype)
    tokens[7::10] = 0  # EOS every 10 tokens
    tokens.tofile(path)
    return tokens


# ---------------------------------------------------------------------------------------------
# Dolma documents


def test_iter_documents_reads_all_formats_in_order(tmp_path: Path) -> None:
    write_dolma(tmp_path / "one.json.gz", docs(["a", "b"], source="s1"))
    write_dolma(tmp_path / "sub" / "two.jsonl.gz", docs(["c"], source="s2"))
    write_dolma(tmp_path / "three.jsonl", docs(["d", "e"]))
    (tmp_path / "notes.txt").write_text("ignored: not a Dolma file")
    read = list(iter_documents([tmp_path]))
    # a directory: its Dolma files recursively, sorted by path (one, sub/two, three)
    assert [d["text"] for d in read] == ["a", "b", "c", "d", "e"]
    assert [d["source"] for d in read] == ["s1", "s1", "s2", "three", "three"]
    assert [d["text"] for d in iter_documents([tmp_path / "three.jsonl", tmp_path / "one.json.gz"])] == list("deab")


def test_iter_documents_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert [d["text"] for d in iter_documents([path])] == ["a", "b"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": "broken"\n', r"bad\.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"id": "x"}\n', r"bad\.jsonl:2: document has no 'text'"),
        ('{"text": 3}\n', r"bad\.jsonl:1: document has a non-string 'text'"),
        ("[1, 2]\n", r"bad\.jsonl:1: a list instead of a JSON object"),
    ],
)
def test_iter_documents_bad_lines(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        list(iter_documents([path]))


def test_iter_documents_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        list(iter_documents([tmp_path / "missing.jsonl"]))
    (tmp_path / "x.txt").write_text("{}")
    with pytest.raises(DataError, match=r"x\.txt: not a Dolma file"):
        list(iter_documents([tmp_path / "x.txt"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Dolma files"):
        list(iter_documents([tmp_path / "empty"]))
    (tmp_path / "corrupt.json.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"corrupt\.json\.gz: corrupt gzip"):
        list(iter_documents([tmp_path / "corrupt.json.gz"]))


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_trained_tokenizer(tokenizer_path: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    assert tokenizer.get_vocab_size() == 300
    assert tokenizer.token_to_id("<|endoftext|>") == 0 == eos_id(tokenizer)
    assert tokenizer.token_to_id("<|padding|>") == 1
    for text in TEXTS:  # byte-level, no prefix space: exact round trip
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    assert tokenizer_fingerprint(tokenizer_path) == hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()
    # deterministic: every rank and node trains the same file
    assert tokenizer_fingerprint(small_tokenizer(tmp_path / "again.json")) == tokenizer_fingerprint(tokenizer_path)


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="vocab 100 is too small"):
        small_tokenizer(tmp_path / "t.json", vocab_size=100)
    with pytest.raises(DataError, match="fewer than the vocab 5000"):
        small_tokenizer(tmp_path / "t.json", vocab_size=5000)
    assert not (tmp_path / "t.json").exists()
    with pytest.raises(DataError, match=r"nothere\.json does not exist"):
        load_tokenizer(tmp_path / "nothere.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match=r"bad\.json cannot be loaded"):
        load_tokenizer(tmp_path / "bad.json")
    big = load_tokenizer(big_vocab_tokenizer(tmp_path / "big.json"))
    assert eos_id(big) == 69_999  # looked up by its string, like OLMo's 50279


# ---------------------------------------------------------------------------------------------
# prepare


def test_prepare_round_trip(dolma_dir: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    meta = prepare([dolma_dir], out, tokenizer_path=tokenizer_path, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a.npy", "b.npy", "metadata.json", "tokenizer.json"]
    assert json.loads((out / "metadata.json").read_text()) == meta
    assert meta["format"] == "megaolmo-tokens" and meta["format_version"] == 1
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300 and meta["eos_token_id"] == 0
    assert meta["tokenizer"] == "tokenizer.json"
    assert (
        meta["tokenizer_fingerprint"]
        == tokenizer_fingerprint(tokenizer_path)
        == tokenizer_fingerprint(out / "tokenizer.json")
    )
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside a document is text, not EOS
    expected = {"a.npy": ("web", TEXTS[:3]), "b.npy": ("b", TEXTS[3:])}  # b's documents have no source: its stem
    for name, (source, texts) in expected.items():
        tokens = np.fromfile(out / name, dtype=np.uint16)  # raw, no header
        assert (tokens == 0).sum() == len(texts)  # EOS after each document and nowhere else
        assert decode_documents(tokens, tokenizer, eos=0) == texts
        n_tokens = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) + 1 for t in texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        stats = {"tokens": n_tokens, "documents": len(texts), "bytes": n_bytes}
        assert meta["files"][name]["sources"] == {source: stats}
        assert {k: meta["files"][name][k] for k in stats} == stats
    assert meta["tokens"] == sum(f["tokens"] for f in meta["files"].values())
    assert meta["documents"] == len(TEXTS)
    assert meta["sources"] == ["b", "web"]


def test_prepare_in_parallel_writes_the_same_files(dolma_dir: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    serial = prepare([dolma_dir], tmp_path / "serial", tokenizer_path=tokenizer_path, progress=False)
    parallel = prepare([dolma_dir], tmp_path / "parallel", tokenizer_path=tokenizer_path, workers=2, progress=False)
    assert {k: v for k, v in serial.items() if k != "files"} == {k: v for k, v in parallel.items() if k != "files"}
    for name in ("a.npy", "b.npy"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes()


def test_prepare_batches_long_input(tmp_path: Path, tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents are tokenized in batches and appended: the result is the same as one batch."""
    texts = [f"document {i} " + "the quick brown fox " * (i % 7) for i in range(50)]
    write_dolma(tmp_path / "many.jsonl", docs(texts))
    whole = prepare([tmp_path / "many.jsonl"], tmp_path / "whole", tokenizer_path=tokenizer_path, progress=False)
    monkeypatch.setattr(tokenize_shard_module, "BATCH_DOCUMENTS", 3)
    batched = prepare([tmp_path / "many.jsonl"], tmp_path / "batched", tokenizer_path=tokenizer_path, progress=False)
    assert batched == whole
    assert (tmp_path / "whole/many.npy").read_bytes() == (tmp_path / "batched/many.npy").read_bytes()


def test_prepare_trains_a_tokenizer(dolma_dir: Path, tmp_path: Path) -> None:
    extra = write_dolma(tmp_path / "extra.jsonl", docs([" ".join(t.split()[::-1]) for t in [*TEXTS] * 4]))
    meta = prepare([dolma_dir, extra], tmp_path / "out", train_tokenizer_vocab=280, progress=False)
    tokenizer = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert tokenizer.get_vocab_size() == meta["vocab_size"] == 280
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tmp_path / "out" / "tokenizer.json")
    assert decode_documents(np.fromfile(tmp_path / "out" / "a.npy", np.uint16), tokenizer, 0) == TEXTS[:3]


def test_token_dtype() -> None:
    assert token_dtype(50280) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(100_278) == np.uint32


def test_prepare_big_vocab_writes_uint32(dolma_dir: Path, tmp_path: Path) -> None:
    tokenizer_path = big_vocab_tokenizer(tmp_path / "big.json")
    meta = prepare([dolma_dir], tmp_path / "out", tokenizer_path=tokenizer_path, progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000 and meta["eos_token_id"] == 69_999
    tokens = np.fromfile(tmp_path / "out" / "a.npy", dtype=np.uint32)
    assert decode_documents(tokens, load_tokenizer(tokenizer_path), eos=69_999) == TEXTS[:3]
    dataset = MemmapDataset([tmp_path / "out"], seq_len=4)  # dtype from metadata.json
    assert dataset.dtypes[0] == np.uint32
    assert torch.equal(dataset[0], torch.from_numpy(tokens[:4].astype(np.int64)))


def test_prepare_errors_write_nothing(dolma_dir: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError, match="exactly one of"):
        prepare([dolma_dir], out, tokenizer_path=tokenizer_path, train_tokenizer_vocab=300, progress=False)
    with pytest.raises(DataError, match="exactly one of"):
        prepare([dolma_dir], out, progress=False)
    bad = write_dolma(tmp_path / "bad" / "c.jsonl", [{"text": "fine"}, {"id": "no text"}])
    with pytest.raises(DataError, match=r"c\.jsonl:2: document has no 'text'"):
        prepare([dolma_dir, bad], out, tokenizer_path=tokenizer_path, progress=False)
    with pytest.raises(DataError, match=r"c\.jsonl:2"):
        prepare([dolma_dir, bad], out, tokenizer_path=tokenizer_path, workers=2, progress=False)
    write_dolma(tmp_path / "other" / "a.jsonl", docs(["x"]))
    with pytest.raises(DataError, match="would both write a.npy"):
        prepare([dolma_dir, tmp_path / "other"], out, tokenizer_path=tokenizer_path, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "dolma", "other"]  # no temporary left
    out.mkdir()
    (out / "old.npy").write_bytes(b"")
    with pytest.raises(DataError, match="already exists and is not empty"):
        prepare([dolma_dir], out, tokenizer_path=tokenizer_path, progress=False)
    (out / "old.npy").unlink()
    prepare([dolma_dir], out, tokenizer_path=tokenizer_path, progress=False)  # an empty directory is fine


def test_cli_error_is_one_line_exit_2_and_writes_nothing(dolma_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "megaolmo.data.prepare", str(dolma_dir), "--out", str(out), "--tokenizer", "nope.json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "nope.json does not exist" in result.stderr
    assert not out.exists()


def test_cli_main(dolma_dir: Path, tokenizer_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = [str(dolma_dir), "--out", str(out), "--tokenizer", str(tokenizer_path), "--no-progress"]
    assert prepare_module.main(args) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: ")
    assert prepare_module.main(args) == 2  # out is not empty any more
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists and is not empty" in err


# ---------------------------------------------------------------------------------------------
# MemmapDataset


def test_olmo_memmaps_read_unchanged(tmp_path: Path) -> None:
    """Files written by OLMo's rules (raw uint16, no metadata): instances cut per file, tails dropped."""
    first = olmo_memmap(tmp_path / "part-0.npy", 35)
    second = olmo_memmap(tmp_path / "part-1.npy", 24)
    dataset = MemmapDataset([tmp_path / "part-0.npy", tmp_path / "part-1.npy"], seq_len=8, dtype="uint16")
    assert len(dataset) == 4 + 3  # 35 // 8 + 24 // 8: the 3 tail tokens of part-0 are not carried over
    expected = [first[i * 8 : (i + 1) * 8] for i in range(4)] + [second[i * 8 : (i + 1) * 8] for i in range(3)]
    for i, instance in enumerate(expected):
        assert dataset[i].dtype == torch.int64 and dataset[i].tolist() == instance.tolist()
    batch = dataset.get_batch(np.array([6, 0, 4])).input_ids
    assert batch.shape == (3, 8) and batch.dtype == torch.int64
    assert batch.tolist() == [expected[6].tolist(), expected[0].tolist(), expected[4].tolist()]
    with pytest.raises(IndexError):
        dataset[7]
    assert len(MemmapDataset([tmp_path], seq_len=8, dtype=np.uint16)) == 7  # a directory: its *.npy, sorted


def test_memmap_dataset_errors(tmp_path: Path, dolma_dir: Path, tokenizer_path: Path) -> None:
    olmo_memmap(tmp_path / "raw.npy", 16)
    with pytest.raises(DataError, match="pass dtype for memmaps without metadata.json"):
        MemmapDataset([tmp_path / "raw.npy"], seq_len=4)
    with pytest.raises(DataError, match=r"token file .*missing\.npy does not exist"):
        MemmapDataset([tmp_path / "missing.npy"], seq_len=4, dtype="uint16")
    (tmp_path / "odd.npy").write_bytes(b"\x00" * 7)
    with pytest.raises(DataError, match=r"odd\.npy: 7 bytes is not a whole number of uint16 tokens"):
        MemmapDataset([tmp_path / "odd.npy"], seq_len=4, dtype="uint16")
    with pytest.raises(DataError, match="cannot hold token ids"):
        MemmapDataset([tmp_path / "raw.npy"], seq_len=4, dtype="float32")
    with pytest.raises(DataError, match="seq_len=0"):
        MemmapDataset([tmp_path / "raw.npy"], seq_len=0, dtype="uint16")
    prepare([dolma_dir], tmp_path / "out", tokenizer_path=tokenizer_path, progress=False)
    with pytest.raises(DataError, match="dtype uint32 was passed but metadata.json says uint16"):
        MemmapDataset([tmp_path / "out" / "a.npy"], seq_len=4, dtype="uint32")
    with open(tmp_path / "out" / "a.npy", "r+b") as f:
        f.truncate(8)
    with pytest.raises(DataError, match=r"a\.npy: 4 tokens but metadata.json records"):
        MemmapDataset([tmp_path / "out"], seq_len=4)


# ---------------------------------------------------------------------------------------------
# Global order and batches


@pytest.fixture
def dataset(tmp_path: Path) -> MemmapDataset:
    """103 instances of 4 tokens; instance i holds 4i..4i+3 (uint32, so every value is distinct)."""
    np.arange(4 * 103 + 2, dtype=np.uint32).tofile(tmp_path / "tokens.npy")
    return MemmapDataset([tmp_path / "tokens.npy"], seq_len=4, dtype="uint32")


def test_global_order_is_olmos_rule() -> None:
    for seed, epoch in [(0, 0), (6198, 0), (6198, 3)]:
        expected = np.random.Generator(np.random.PCG64(seed + epoch)).permutation(1000)
        assert np.array_equal(global_order(1000, seed, epoch), expected)
    assert not np.array_equal(global_order(1000, 1, 0), global_order(1000, 1, 1))


def test_batches_follow_the_global_order(dataset: MemmapDataset) -> None:
    batches = GlobalBatches(dataset, global_batch_size=8, seed=17)
    assert batches.batches_per_epoch == 12  # 103 // 8, the last partial batch dropped
    order = global_order(103, 17, 0)
    for step in (0, 5, 11):
        expected = order[step * 8 : (step + 1) * 8]
        assert batches.batch(step).input_ids[:, 0].tolist() == (expected * 4).tolist()
    seen = torch.cat([batches.batch(s).input_ids for s in range(12)])[:, 0] // 4
    assert len(set(seen.tolist())) == 96  # no instance twice within an epoch


def test_epoch_rollover(dataset: MemmapDataset) -> None:
    batches = GlobalBatches(dataset, global_batch_size=8, seed=17)
    for epoch in (1, 2):
        order = global_order(103, 17, epoch)
        for position in (0, 11):
            step = epoch * 12 + position
            expected = order[position * 8 : (position + 1) * 8] * 4
            assert batches.batch(step).input_ids[:, 0].tolist() == expected.tolist()
    assert batches.step == 36 and batches.epoch == 3  # the next step to train opens epoch 3


@pytest.mark.parametrize("dp", [1, 2, 4, 8])
def test_batches_do_not_depend_on_dp(dataset: MemmapDataset, dp: int) -> None:
    batches = GlobalBatches(dataset, global_batch_size=8, seed=3)
    for step in (0, 7, 13):
        whole = batches.batch(step).input_ids
        shares = [GlobalBatches.dp_share(batches.batch(step), r, dp).input_ids for r in range(dp)]
        assert torch.equal(torch.cat(shares), whole)
        for rank in range(dp):  # reading only a rank's rows gives the same rows
            assert torch.equal(batches.batch(step, dp_rank=rank, dp=dp).input_ids, shares[rank])


def test_resume_mid_epoch(dataset: MemmapDataset) -> None:
    run = GlobalBatches(dataset, global_batch_size=8, seed=5)
    reference = [run.batch(step).input_ids for step in range(20)]  # crosses into epoch 1
    interrupted = GlobalBatches(dataset, global_batch_size=8, seed=5)
    for step in range(7):
        interrupted.batch(step)
    state = interrupted.state_dict()
    assert state == {"samples_seen": 56, "seed": 5, "global_batch_size": 8, "instances": len(dataset)}
    resumed = GlobalBatches(dataset, global_batch_size=8, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert resumed.step == 7
    for step in range(7, 20):
        assert torch.equal(resumed.next_batch().input_ids, reference[step])
    assert resumed.state_dict()["samples_seen"] == 20 * 8


def test_batch_errors(dataset: MemmapDataset) -> None:
    with pytest.raises(DataError, match="data has 103 instances of 4 tokens, fewer than one global batch of 128"):
        GlobalBatches(dataset, global_batch_size=128, seed=0)
    batches = GlobalBatches(dataset, global_batch_size=8, seed=0)
    with pytest.raises(DataError, match="does not split over dp=3"):
        GlobalBatches.dp_share(batches.batch(0), 0, 3)
    with pytest.raises(DataError, match="dp_rank=2 is outside 0..1"):
        batches.batch(0, dp_rank=2, dp=2)
    with pytest.raises(DataError, match="saved with seed=1 but this run has seed=0; resume with seed=1"):
        batches.load_state_dict({"samples_seen": 8, "seed": 1, "global_batch_size": 8})
    with pytest.raises(DataError, match="samples_seen=12 is not a whole number"):
        batches.load_state_dict({"samples_seen": 12, "seed": 0, "global_batch_size": 8})
    with pytest.raises(DataError, match="saved over 104 instances but this run's data has 103; resume with the same"):
        batches.load_state_dict({"samples_seen": 8, "seed": 0, "global_batch_size": 8, "instances": 104})
    batches.load_state_dict({"samples_seen": 8, "seed": 0, "global_batch_size": 8})  # an older state: no count


# ---------------------------------------------------------------------------------------------
# The order on disk (memory-mapped, built once)


@pytest.mark.parametrize("dtype", [None, "uint64"])  # None: the default, uint32 below 2**32 instances
def test_order_file_is_olmos_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str | None) -> None:
    monkeypatch.setattr(order_module, "CHUNK", 7)  # arange written in many chunks, the last one partial
    for n, seed, epoch in [(1, 0, 0), (1000, 0, 0), (1000, 6198, 0), (1000, 6198, 3), (4099, 17, 2)]:
        path = build_order(tmp_path, n, seed, epoch, dtype=dtype)
        assert path.name == f"order-n{n}-seed{seed}-epoch{epoch}.{'u64' if dtype else 'u32'}"
        order = open_order(tmp_path, n, seed, epoch, dtype=dtype)
        assert order.dtype == np.dtype(dtype or "uint32") and order.mode == "r"
        assert np.array_equal(order, np.random.Generator(np.random.PCG64(seed + epoch)).permutation(n))
    assert not list(tmp_path.glob("*.tmp"))  # every build renamed its temporary file into place
    assert order_module.order_dtype(2**32) == np.uint32 and order_module.order_dtype(2**32 + 1) == np.uint64


def test_batches_from_order_files_match_memory(dataset: MemmapDataset, tmp_path: Path) -> None:
    order_dir = tmp_path / "data_order"
    in_memory = GlobalBatches(dataset, global_batch_size=8, seed=5)
    on_disk = GlobalBatches(dataset, global_batch_size=8, seed=5, order_dir=order_dir)
    assert on_disk.epoch_of(11) == 0 and on_disk.epoch_of(12) == 1
    assert on_disk.prepare_order(0) == order_dir / "order-n103-seed5-epoch0.u32"
    assert in_memory.prepare_order(0) is None  # nothing to prepare for an in-memory order
    reference = [in_memory.batch(step).input_ids for step in range(30)]  # crosses into epochs 1 and 2
    for step in range(30):
        assert np.array_equal(on_disk.indices(step), in_memory.indices(step))
        assert torch.equal(on_disk.batch(step).input_ids, reference[step])
    assert sorted(p.name for p in order_dir.iterdir()) == [f"order-n103-seed5-epoch{e}.u32" for e in range(3)]
    built = (order_dir / "order-n103-seed5-epoch1.u32").stat().st_mtime_ns
    on_disk.prepare_order(1)  # already there: not built again
    assert (order_dir / "order-n103-seed5-epoch1.u32").stat().st_mtime_ns == built
    state = GlobalBatches(dataset, global_batch_size=8, seed=5)
    for step in range(17):
        state.batch(step)
    for path in order_dir.iterdir():  # derived data: a resume without the files builds them again
        path.unlink()
    resumed = GlobalBatches(dataset, global_batch_size=8, seed=5, order_dir=order_dir)
    resumed.load_state_dict(json.loads(json.dumps(state.state_dict())))
    for step in range(17, 30):
        assert torch.equal(resumed.next_batch().input_ids, reference[step])


def test_damaged_order_file_is_refused(dataset: MemmapDataset, tmp_path: Path) -> None:
    path = build_order(tmp_path, 103, 5, 0)
    os.truncate(path, 100)
    batches = GlobalBatches(dataset, global_batch_size=8, seed=5, order_dir=tmp_path)
    with pytest.raises(DataError, match=r"order-n103-seed5-epoch0\.u32 has 100 bytes, not the 412 .*delete it") as err:
        batches.indices(0)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"order-n103-seed5-epoch1\.u32 does not exist; build it first"):
        open_order(tmp_path, 103, 5, 1)
    with pytest.raises(DataError, match="dtype int64 cannot index 103 instances; use uint32 or uint64"):
        build_order(tmp_path, 103, 5, 0, dtype="int64")


class DolmaScale:
    """A stand-in for a dataset of Dolma's size: only its length, no tokens on disk."""

    seq_len = 2048

    def __len__(self) -> int:
        return 1_500_000_000


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS), page cache of its memmaps included."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read resident memory")
def test_order_memory_at_dolma_scale(tmp_path: Path) -> None:
    n = len(DolmaScale())  # global_order(n) would hold 12 GB of int64 on every rank
    for epoch in range(3):  # the files rank 0 built, simulated: sparse, of the right size
        path = order_module.order_path(tmp_path, n, 6198, epoch)
        path.touch()
        os.truncate(path, 4 * n)
    before = resident_bytes()
    batches = GlobalBatches(DolmaScale(), global_batch_size=1024, seed=6198, order_dir=tmp_path)
    per_epoch = batches.batches_per_epoch
    for step in [0, 1, per_epoch // 2, per_epoch - 1, per_epoch, per_epoch + 7, 3 * per_epoch - 1]:
        indices = batches.indices(step)
        assert indices.dtype == np.int64 and indices.shape == (1024,)
        assert indices.base is None and indices.flags.owndata  # a small copy, pinning no whole order
    grown = resident_bytes() - before
    assert grown < 100 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB for a 1.5 B-instance order"


# ---------------------------------------------------------------------------------------------
# Compatibility of data and model


def test_check_compatible(dolma_dir: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    prepare([dolma_dir], tmp_path / "out", tokenizer_path=tokenizer_path, progress=False)
    fingerprint = tokenizer_fingerprint(tokenizer_path)
    check_compatible(tmp_path / "out", fingerprint, 300)
    check_compatible([tmp_path / "out" / "a.npy", tmp_path / "out" / "b.npy"], fingerprint, 50304)
    check_compatible(tmp_path / "out" / "metadata.json", None, 300)
    check_compatible(tmp_path / "out", tokenizer_path, 300)  # the tokenizer file itself stands for its fingerprint
    with pytest.raises(DataError, match="tokenized with tokenizer"):
        check_compatible(tmp_path / "out", small_tokenizer(tmp_path / "other.json", 290), 300)
    with pytest.raises(DataError, match=f"tokenized with tokenizer {fingerprint[:12]}.. but the model expects 0000"):
        check_compatible(tmp_path / "out", "0" * 64, 300)
    with pytest.raises(DataError, match="has vocab 300, which exceeds model.vocab_size=256"):
        check_compatible(tmp_path / "out", fingerprint, 256)
    with pytest.raises(DataError, match="does not exist"):
        check_compatible(tmp_path / "nowhere", fingerprint, 300)
    olmo_memmap(tmp_path / "raw.npy", 8)
    check_compatible([tmp_path / "raw.npy"], fingerprint, 300)  # no metadata.json: nothing to check


# ---------------------------------------------------------------------------------------------
# The built-in corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    """Built once (its time shows in `--durations` as this fixture's setup, never asserted)."""
    return builtin_corpus(tmp_path_factory.mktemp("megaolmo-cache"), progress=False)


def test_builtin_corpus(corpus) -> None:
    built = corpus
    assert built.root.name == f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-v4096"
    train, valid = read_metadata(built.train_dir), read_metadata(built.valid_dir)
    assert train["vocab_size"] == valid["vocab_size"] == 4096 and train["dtype"] == "uint16"
    assert (
        train["tokenizer_fingerprint"] == valid["tokenizer_fingerprint"] == tokenizer_fingerprint(built.tokenizer_path)
    )
    assert train["tokens"] > 1_000_000 and valid["tokens"] > 10_000
    assert {"json", "os", "asyncio"} <= set(train["sources"])
    assert [p.stat().st_size for p in built.train_paths] == [2 * f["tokens"] for f in train["files"].values()]
    for source, path in built.valid_sources.items():  # one memmap per source
        assert valid["files"][path.name]["sources"].keys() == {source}
        assert path.stat().st_size > 0
    assert len(built.valid_paths) == len(valid["sources"]) >= 3
    check_compatible(built.metadata_dir, tokenizer_fingerprint(built.tokenizer_path), 4096)
    assert len(MemmapDataset(built.train_paths, seq_len=256)) > 4000


def test_builtin_corpus_splits_are_disjoint(corpus) -> None:
    built = corpus
    train_ids = [d["id"] for d in iter_documents([built.documents_dir / "train.jsonl.gz"])]
    valid_docs = list(iter_documents([built.documents_dir / "valid"]))
    valid_ids = [d["id"] for d in valid_docs]
    assert not set(train_ids) & set(valid_ids)
    assert all(is_valid(i) for i in valid_ids) and not any(is_valid(i) for i in train_ids)
    assert train_ids == sorted(train_ids) and "json/decoder.py" in train_ids + valid_ids
    assert not any(part in ("test", "tests", "idlelib") for i in train_ids for part in i.split("/")[:-1])
    assert all(d["source"] == d["id"].split("/")[0].removesuffix(".py") for d in valid_docs)


def test_builtin_corpus_is_cached(corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    built = corpus

    def rebuild(*args, **kwargs):
        raise AssertionError("the cached corpus was built again")

    monkeypatch.setattr(corpus_module, "_build", rebuild)
    again = builtin_corpus(built.root.parent, progress=False)
    assert again == built
