"""Paloma's own numbers from megaolmo.eval.perplexity: its record format, its windows, its aggregates.

Documents are written here in Paloma's released format (text, id, added, source, subdomain, and metadata
as a JSON string). A word-level tokenizer makes every word one token, so token counts and windows are
known exactly. Expected rows follow Paloma's evaluation code (OLMo-Eval -> catwalk -> lm-eval-harness
rolling windows with context_len=1), built here by hand; expected figures come from per-document NLLs
that the test computes itself with a direct log-softmax over the tiny model's logits on those rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from data_fixtures import write_dolma
from helpers import small_model
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

import megaolmo
from megaolmo.data import iter_documents
from megaolmo.data.groups import document_domain, group_name, source_of_group
from megaolmo.errors import EvalError
from megaolmo.eval.perplexity import score_documents
from megaolmo.eval.report import perplexity_table
from megaolmo.eval.scoring import Row, score_rows

CONTEXT = 16
EOS = 0
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "news", "reddit", "post", "said"]


def word_tokenizer() -> Tokenizer:
    """One token per whitespace-separated word; `<|endoftext|>` is id 0, as in megaolmo's BPE."""
    vocab = {"<|endoftext|>": EOS, "<unk>": 1} | {word: i + 2 for i, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tokenizer


def words(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i * 5) % len(WORDS)] for i in range(n))


def paloma_record(doc_id: str, source: str, subdomain: str | None, text: str) -> dict:
    """A record as Paloma's files hold it: metadata is a JSON string, not an object."""
    record = {"text": text, "id": doc_id, "added": "2023-11-30T00:00:00.000Z", "source": source}
    if subdomain is not None:
        record["subdomain"] = subdomain
    return record | {"metadata": json.dumps({"url": f"https://example.org/{doc_id}", "truncated_portion": ""})}


RECORDS = [  # two sources, three subdomains; documents 1 and 3 are longer than the context
    paloma_record("c4-0", "c4_100_domains", "www.nytimes.com", words(9)),
    paloma_record("c4-1", "c4_100_domains", "www.nytimes.com", words(40, offset=1)),
    paloma_record("c4-2", "c4_100_domains", "www.bbc.co.uk", words(5, offset=2)),
    paloma_record("rd-0", "dolma_100_subreddits", "depression", words(33, offset=3)),
    paloma_record("rd-1", "dolma_100_subreddits", "depression", words(12, offset=4)),
]
DOMAINS = {
    "c4_100_domains/www.nytimes.com": ["c4-0", "c4-1"],
    "c4_100_domains/www.bbc.co.uk": ["c4-2"],
    "dolma_100_subreddits/depression": ["rd-0", "rd-1"],
}


def paloma_windows(ids: list[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(model inputs, predicted tokens) per window, as Paloma's evaluation cuts a document: EOS then the
    first max_length - 1 tokens predict the first max_length tokens; each later window predicts the next
    max_length tokens (fewer at the end) from the max_length tokens just before its last one."""
    first = min(max_length, len(ids))
    windows = [([EOS, *ids[: first - 1]], ids[:first])] if ids else []
    done = first
    while done < len(ids):
        count = min(max_length, len(ids) - done)
        end = done + count
        windows.append((ids[end - max_length - 1 : end - 1], ids[done:end]))
        done = end
    return windows


@torch.no_grad()
def window_nll(model: torch.nn.Module, inputs: list[int], targets: list[int]) -> float:
    """-log p(targets) read off the last len(targets) positions of one forward pass over `inputs`."""
    logits = model(torch.tensor([inputs]))[0, -len(targets) :].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(targets)[:, None])
    return -float(logprobs.double().sum())


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    config = small_model(max_sequence_length=CONTEXT)
    model = megaolmo.build_model(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that documents' losses differ clearly
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    return model


def test_paloma_records_group_by_source_and_subdomain() -> None:
    groups = [group_name(record) for record in RECORDS]
    nytimes, bbc, depression = DOMAINS
    assert groups == [nytimes, nytimes, bbc, depression, depression]
    assert {source_of_group(g) for g in groups} == {"c4_100_domains", "dolma_100_subreddits"}
    no_subdomain = paloma_record("4chan-0", "4chan_meta_sep", None, "post")  # metadata names no domain
    assert (document_domain(no_subdomain), group_name(no_subdomain)) == (None, "4chan_meta_sep")
    in_metadata = {"text": "x", "source": "s", "metadata": json.dumps({"subdomain": "a/b"})}
    assert (group_name(in_metadata), source_of_group(group_name(in_metadata))) == ("s/a/b", "s")


def test_paloma_windows_predict_each_token_once_with_paloma_context() -> None:
    """A 40-token document at max_length 16: rows [EOS]+t[0:16], t[15:32] and t[23:40], nothing after it."""
    tokenizer = word_tokenizer()
    ids = tokenizer.encode(words(40), add_special_tokens=False).ids
    assert len(ids) == 40 and EOS not in ids
    seen: list[Row] = []

    def recording_scorer(rows: list[Row]) -> list[float]:
        seen.extend(rows)
        return [-0.5 * row.n_scored for row in rows]

    model = type("Context", (), {"config": type("Config", (), {"max_sequence_length": CONTEXT})()})()
    result = score_documents(model, tokenizer, [{"text": words(40), "source": "s"}], scorer=recording_scorer)
    assert (
        seen
        == [
            Row((EOS, *ids[0:16]), 16),  # the first token is predicted from EOS alone
            Row(tuple(ids[15:32]), 16),  # a disjoint block: its first token sees one token of context
            Row(tuple(ids[23:40]), 8),  # the last block reads a full window of 16 inputs
        ]
    )
    assert [(list(row.tokens[:-1]), list(row.tokens[-row.n_scored :])) for row in seen] == paloma_windows(ids, 16)
    predicted, contexts = [], []
    for row in seen:
        n_inputs = len(row.tokens) - 1
        assert n_inputs == CONTEXT
        for position in range(n_inputs - row.n_scored, n_inputs):
            predicted.append(row.tokens[position + 1])
            contexts.append(position + 1)
    assert predicted == ids  # every text token exactly once, in order, and no closing EOS
    assert contexts == [*range(1, 17), *range(1, 17), *range(9, 17)]
    assert (result["overall"]["tokens"], result["overall"]["nll"]) == (40, 20.0)
    assert (result["convention"], result["max_length"], result["stride"]) == ("paloma", CONTEXT, CONTEXT)

    seen.clear()
    score_documents(model, tokenizer, [{"text": words(40)}], convention="olmo-in-loop", scorer=recording_scorer)
    stream = [*ids, EOS]  # OLMo's in-loop data: the document then EOS, in disjoint chunks of 16
    assert seen == [Row(tuple(stream[0:16]), 15), Row(tuple(stream[16:32]), 15), Row(tuple(stream[32:41]), 8)]

    seen.clear()
    score_documents(model, tokenizer, [{"text": words(40)}], stride=8, scorer=recording_scorer)
    assert [(row.tokens[-1], row.n_scored) for row in seen] == [(ids[15], 16), (ids[23], 8), (ids[31], 8), (ids[39], 8)]
    assert all(len(row.tokens) == CONTEXT + 1 for row in seen)  # each later token sees at least 9 of context


def test_paloma_figures_match_a_hand_computation(model: torch.nn.Module, tmp_path: Path) -> None:
    tokenizer = word_tokenizer()
    path = write_dolma(tmp_path / "paloma" / "val_00000000.jsonl.gz", RECORDS)
    results = score_documents(model, tokenizer, iter_documents([path]), batch_size=3, per_document=True)

    by_id = {}
    for record in RECORDS:
        ids = tokenizer.encode(record["text"], add_special_tokens=False).ids
        nll = sum(window_nll(model, inputs, targets) for inputs, targets in paloma_windows(ids, CONTEXT))
        by_id[record["id"]] = {"tokens": len(ids), "bytes": len(record["text"].encode()), "nll": nll}
    assert by_id["c4-1"]["tokens"] > 2 * CONTEXT  # windows are exercised
    for record in results["documents"]:
        expected = by_id[record["id"]]
        assert (record["tokens"], record["bytes"]) == (expected["tokens"], expected["bytes"])
        assert record["nll"] == pytest.approx(expected["nll"], rel=1e-5)

    def figures(ids: list[str]) -> dict[str, float]:
        nll = sum(by_id[i]["nll"] for i in ids)
        tokens = sum(by_id[i]["tokens"] for i in ids)
        n_bytes = sum(by_id[i]["bytes"] for i in ids)
        loss = nll / tokens
        return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nll / math.log(2) / n_bytes}

    assert list(results["groups"]) == sorted(DOMAINS)
    domain = {name: figures(ids) for name, ids in DOMAINS.items()}
    for name, expected in domain.items():
        summary = results["groups"][name]
        assert summary["documents"] == len(DOMAINS[name])
        assert {key: summary[key] for key in expected} == pytest.approx(expected, rel=1e-5)

    def average(names: list[str]) -> dict[str, float]:
        return {key: sum(domain[n][key] for n in names) / len(names) for key in ("loss", "perplexity", "bits_per_byte")}

    c4 = ["c4_100_domains/www.nytimes.com", "c4_100_domains/www.bbc.co.uk"]
    reddit = ["dolma_100_subreddits/depression"]
    sources = {"c4_100_domains": (["c4-0", "c4-1", "c4-2"], c4), "dolma_100_subreddits": (["rd-0", "rd-1"], reddit)}
    assert list(results["sources"]) == list(sources)
    for name, (ids, members) in sources.items():
        summary = results["sources"][name]
        expected = figures(ids)  # token-weighted over all the source's documents
        assert {key: summary[key] for key in expected} == pytest.approx(expected, rel=1e-5)
        assert summary["domain_average"]["domains"] == len(members)
        mean = {key: summary["domain_average"][key] for key in ("loss", "perplexity", "bits_per_byte")}
        assert mean == pytest.approx(average(members), rel=1e-5)
    overall_mean = {key: results["domain_average"][key] for key in ("loss", "perplexity", "bits_per_byte")}
    assert results["domain_average"]["domains"] == 3
    assert overall_mean == pytest.approx(average(list(DOMAINS)), rel=1e-5)  # the mean of perplexities, as Paloma
    assert results["domain_average"]["perplexity"] != pytest.approx(math.exp(results["domain_average"]["loss"]))
    expected = figures(list(by_id))
    assert {key: results["overall"][key] for key in expected} == pytest.approx(expected, rel=1e-5)

    scorer = score_documents(model, tokenizer, RECORDS, scorer=lambda rows: score_rows(model, rows, pad_id=EOS))
    for name, summary in results["groups"].items():  # the scorer path scores the same rows
        assert scorer["groups"][name] == pytest.approx(summary)

    table = perplexity_table(results).splitlines()
    assert [line.split()[:2] for line in table[1:]] == [
        ["c4_100_domains", "2"],
        ["dolma_100_subreddits", "1"],
        ["overall", "3"],
    ]
    assert table[-1].split()[-1] == f"{results['domain_average']['perplexity']:.3f}"
    detailed = [line.split()[0] for line in perplexity_table(results, domains=True).splitlines()[1:]]
    assert detailed == ["c4_100_domains", *sorted(c4), "dolma_100_subreddits", *reddit, "overall"]


def test_conventions_and_windows_are_checked() -> None:
    tokenizer = word_tokenizer()
    model = type("Context", (), {"config": type("Config", (), {"max_sequence_length": CONTEXT})()})()
    docs = [{"text": "the dog"}]
    with pytest.raises(EvalError, match="not one of paloma, olmo-in-loop"):
        score_documents(model, tokenizer, docs, convention="megaolmo")
    with pytest.raises(EvalError, match="stride applies to the paloma convention only"):
        score_documents(model, tokenizer, docs, convention="olmo-in-loop", stride=4)
    with pytest.raises(EvalError, match="stride 17 must be between 1 and max_length 16"):
        score_documents(model, tokenizer, docs, stride=17)
