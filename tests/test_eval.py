"""`python -m megaolmo.eval` and its Python API: perplexity per source/domain and downstream rank classification.

One tiny random model (d_model 64, 2 layers, context 64) is saved, exported with `megaolmo.convert to-hf`
and loaded with transformers' OlmoForCausalLM; every log-likelihood megaolmo's evaluators report is
recomputed with transformers on the same token ids. The tokenizer, documents and task files are
written here.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from data_fixtures import small_tokenizer, write_dolma
from helpers import assert_ok, small_model

import megaolmo
from megaolmo.checkpoint import save_consolidated
from megaolmo.convert import __main__ as convert
from megaolmo.data import load_tokenizer
from megaolmo.eval import evaluate_tasks, load_tasks, score_documents, sliding_windows
from megaolmo.eval.__main__ import main
from megaolmo.eval.downstream import predict

CONTEXT = 64
ATOL = 1e-4
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "data", "tokens", "model"]
TEXTS = {
    "short": "The quick brown fox jumps over the lazy dog.",
    "unicode": "Unicode too: naïve café, 東京, emoji 🙂 and\ttabs.",
    "empty": "",
    "special": "A document that mentions <|endoftext|> in its text.",
    "long": " ".join(" ".join(WORDS[i % 7 : i % 7 + 5]) for i in range(40)),
}


# ---------------------------------------------------------------------------------------------
# Fixtures: tokenizer, checkpoint, its Hugging Face twin, documents and tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    tokenizer_path = small_tokenizer(root / "tokenizer.json", vocab_size=300)
    config = small_model(ffn_hidden_size=128, vocab_size=300, max_sequence_length=CONTEXT)
    model = megaolmo.build_model(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that log-probabilities differ by far more than the tolerance
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    ckpt = root / "ckpt"
    save_consolidated(ckpt, config, model.state_dict())
    assert convert.main(["to-hf", str(ckpt), str(root / "hf")]) == 0
    hf = transformers.OlmoForCausalLM.from_pretrained(root / "hf").eval()
    return {
        "root": root,
        "tokenizer_path": tokenizer_path,
        "tokenizer": load_tokenizer(tokenizer_path),
        "ckpt": ckpt,
        "model": megaolmo.load(ckpt),
        "hf": hf,
    }


@torch.no_grad()
def hf_logprob(hf: transformers.OlmoForCausalLM, tokens: list[int], n_scored: int) -> float:
    """Summed log-probability, computed by transformers, of the last `n_scored` of `tokens`."""
    logits = hf(torch.tensor([tokens[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)[-n_scored:]
    return float(logprobs.gather(-1, torch.tensor(tokens[-n_scored:])[:, None]).double().sum())


def doc_tokens(tokenizer, text: str) -> list[int]:
    tokenizer.encode_special_tokens = True
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    tokenizer.encode_special_tokens = False
    return [0, *ids]  # Paloma's convention: EOS (id 0 in megaolmo's BPE) as context, no closing EOS


def write_docs(root: Path) -> Path:
    """Two sources (one with domains) in two files; one file's documents get their source from its name."""
    folder = root / "docs"
    write_dolma(
        folder / "web.jsonl.gz",
        [
            {"id": "a", "text": TEXTS["short"], "source": "web", "metadata": {"domain": "news"}},
            {"id": "b", "text": TEXTS["unicode"], "source": "web", "domain": "blogs"},
            {"id": "c", "text": TEXTS["long"], "source": "web", "metadata": {"domain": "news"}},
        ],
    )
    write_dolma(folder / "wiki.jsonl", [{"id": "d", "text": TEXTS["special"]}, {"id": "e", "text": TEXTS["empty"]}])
    return folder


def simple_task(path: Path) -> Path:
    """Six questions, one with no context and one whose context is longer than the model's window."""
    examples = [
        {"context": "Question: which animal is quick?\nAnswer:", "choices": [" fox", " dog", " seed"], "label": 0},
        {"context": "The lazy", "choices": [" dog", " data token"], "label": 0},
        {"context": "", "choices": [" the quick brown fox", " model"], "label": 1},
        {"context": TEXTS["long"] * 2, "choices": [" over", " the lazy dog", " tokens"], "label": 2},
        {"context": "Unicode: naïve", "choices": [" café", " 東京", " 🙂"], "label": 1},
        {"context": "jumps over the", "choices": [" lazy dog"], "label": 0},
    ]
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    return path


def olmo_task(folder: Path) -> Path:
    """OLMo's layout: <task>/<variant>/requests.jsonl.gz + config.json, with oe-eval's unconditional requests."""
    folder.mkdir(parents=True)
    config = {"task_name": "piqa", "task_config": {"primary_metric": "acc_per_char", "metric_kwargs": {}}}
    config["task_config"]["metric_kwargs"]["uncond_docid_offset"] = 1000000
    (folder / "config.json").write_text(json.dumps(config))
    docs = [
        ("Goal: ready a cage\nAnswer:", [" the quick fox", " a lazy dog"], 1),
        ("Goal: model data\nAnswer:", [" tokens", " seed", " brown"], 2),
    ]
    requests = []
    for doc_id, (context, choices, label) in enumerate(docs):
        for idx, choice in reversed(list(enumerate(choices))):  # out of order on purpose: idx orders them
            for offset, ctx in ((0, context), (1000000, "Answer:")):
                request = {"context": ctx, "continuation": choice}
                requests.append(
                    {"request_type": "loglikelihood", "doc": {"query": context}, "request": request, "idx": idx}
                    | {"task_name": "piqa", "doc_id": doc_id + offset, "native_id": doc_id, "label": label}
                )
    with gzip.open(folder / "requests.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in requests)
    return folder


def run_main(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# Perplexity


@pytest.mark.parametrize("n_tokens", [2, 3, 17, 64, 65, 66, 200])
@pytest.mark.parametrize(("max_length", "stride"), [(64, 32), (64, 64), (64, 1), (16, 5), (1, 1)])
def test_sliding_windows_predict_every_token_once(n_tokens: int, max_length: int, stride: int) -> None:
    predicted = []
    for begin, n_scored in sliding_windows(n_tokens, max_length, stride):
        end = min(begin + max_length, n_tokens - 1)  # the window's inputs are tokens[begin:end]
        assert end - begin == min(max_length, n_tokens - 1)  # every window reads a full context, the last too
        first = end + 1 - n_scored
        assert first >= begin + 1  # a scored token is predicted from inside its window
        if first > 1:
            assert first - begin >= min(first, max_length - stride + 1)  # the promised left context
        predicted.extend(range(first, end + 1))
    assert predicted == list(range(1, n_tokens))


def test_perplexity_matches_transformers(setup: dict) -> None:
    """Per-document NLL sums equal transformers' on [EOS] + ids, with and without windows."""
    tokenizer, hf = setup["tokenizer"], setup["hf"]
    docs = [{"id": name, "text": text, "source": "s"} for name, text in TEXTS.items()]
    assert len(doc_tokens(tokenizer, TEXTS["long"])) > 3 * CONTEXT  # the long one needs windows at 64 too
    for max_length, stride in ((64, 32), (64, 64), (16, 5), (16, 16)):
        results = score_documents(
            setup["model"], tokenizer, docs, max_length=max_length, stride=stride, per_document=True
        )
        assert [r["id"] for r in results["documents"]] == list(TEXTS)
        for record, doc in zip(results["documents"], docs):
            tokens = doc_tokens(tokenizer, doc["text"])
            assert record["tokens"] == len(tokens) - 1  # every text token, once
            # transformers on each window's inputs; the window's last n_scored predictions count
            expected = 0.0
            for begin, n_scored in sliding_windows(len(tokens), max_length, stride):
                expected -= hf_logprob(hf, tokens[begin : begin + max_length + 1], n_scored)
            assert record["nll"] == pytest.approx(expected, abs=ATOL), (doc["id"], max_length, stride)


def test_window_scoring_equals_one_pass_when_the_document_fits(setup: dict) -> None:
    tokenizer = setup["tokenizer"]
    docs = [{"text": TEXTS["short"]}, {"text": TEXTS["unicode"]}]
    for doc in docs:
        tokens = doc_tokens(tokenizer, doc["text"])
        assert len(tokens) - 1 <= CONTEXT
        one_pass = -hf_logprob(setup["hf"], tokens, len(tokens) - 1)
        for max_length, stride in ((CONTEXT, 32), (CONTEXT, 1), (CONTEXT, CONTEXT), (len(tokens) - 1, 3)):
            result = score_documents(setup["model"], tokenizer, [doc], max_length=max_length, stride=stride)
            assert result["overall"]["nll"] == pytest.approx(one_pass, abs=ATOL)


def test_groups_bytes_and_bits_per_byte(setup: dict) -> None:
    folder = write_docs(setup["root"] / "groups")
    from megaolmo.data import iter_documents

    results = score_documents(setup["model"], setup["tokenizer"], iter_documents([folder]), per_document=True)
    assert (results["convention"], results["max_length"], results["stride"]) == ("paloma", CONTEXT, CONTEXT)
    assert list(results["groups"]) == ["web/blogs", "web/news", "wiki"]
    by_id = {r["id"]: r for r in results["documents"]}
    for doc_id, text in zip("abcde", [TEXTS[k] for k in ("short", "unicode", "long", "special", "empty")]):
        assert by_id[doc_id]["bytes"] == len(text.encode("utf-8"))
    assert results["groups"]["web/blogs"]["bytes"] == len(TEXTS["unicode"].encode()) > len(TEXTS["unicode"])
    for name, members in (("web/news", "ac"), ("web/blogs", "b"), ("wiki", "de")):
        group = results["groups"][name]
        nll = sum(by_id[m]["nll"] for m in members)
        n_bytes = sum(by_id[m]["bytes"] for m in members)
        tokens = sum(by_id[m]["tokens"] for m in members)
        assert group["documents"] == len(members) and group["tokens"] == tokens and group["bytes"] == n_bytes
        assert group["nll"] == pytest.approx(nll)
        assert group["loss"] == pytest.approx(nll / tokens)
        assert group["perplexity"] == pytest.approx(math.exp(nll / tokens))
        assert group["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes)
    overall = results["overall"]
    assert overall["documents"] == 5
    assert overall["bytes"] == sum(len(t.encode()) for t in TEXTS.values())
    assert overall["nll"] == pytest.approx(sum(r["nll"] for r in results["documents"]))


# ---------------------------------------------------------------------------------------------
# Downstream


def test_downstream_matches_transformers(setup: dict) -> None:
    tokenizer, hf = setup["tokenizer"], setup["hf"]
    tasks = load_tasks([simple_task(setup["root"] / "tiny_qa.jsonl"), olmo_task(setup["root"] / "piqa" / "rc_0shot")])
    assert [(t.name, t.normalization, len(t.examples)) for t in tasks] == [
        ("tiny_qa", "per-character", 6),
        ("piqa_rc_0shot", "per-character", 2),
    ]
    assert tasks[1].examples[1].continuations == (" tokens", " seed", " brown")
    assert tasks[1].examples[1].unconditional == "Answer:"
    results = evaluate_tasks(setup["model"], tokenizer, tasks, batch_size=5, per_example=True)

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    for task in tasks:
        scored = results["tasks"][task.name]["per_example"]
        for example, ex in zip(task.examples, scored):
            for i, (context, continuation) in enumerate(zip(example.contexts, example.continuations)):
                cont = ids(continuation)
                for ctx, key in ((ids(context) or [0], "logprobs"), (ids("Answer:"), "uncond_logprobs")):
                    tokens = (ctx + cont)[-(CONTEXT + 1) :]  # a context too long is cut from the left
                    assert ex[key][i] == pytest.approx(hf_logprob(hf, tokens, len(cont)), abs=ATOL)
                assert ex["tokens"][i] == len(cont)
                assert ex["chars"][i] == len(continuation) - 1
        # accuracy is what the per-example scores say, under every normalization
        for norm, accuracy in results["tasks"][task.name]["accuracy_by_normalization"].items():
            assert accuracy == pytest.approx(sum(predict(ex, norm) == ex["label"] for ex in scored) / len(scored))
    accuracies = [results["tasks"][t.name]["accuracy"] for t in tasks]
    assert results["average"] == pytest.approx(sum(accuracies) / 2)
    raw = evaluate_tasks(setup["model"], tokenizer, tasks[:1], normalization="none")["tasks"]["tiny_qa"]
    assert raw["normalization"] == "none" and raw["accuracy"] == raw["accuracy_by_normalization"]["none"]


def test_normalizations_rank_differently() -> None:
    choices = {  # each normalization prefers a different choice
        "logprobs": [-4.0, -6.0, -5.0, -7.0],
        "tokens": [1, 3, 5, 1],
        "chars": [1, 12, 3, 1],
        "uncond_logprobs": [-1.0, -8.0, -2.0, -20.0],
    }
    assert [predict(choices, n) for n in ("none", "per-token", "per-character", "unconditional")] == [0, 2, 1, 3]
    assert predict({**choices, "logprobs": [-4.0, -4.0, -9.0, -9.0]}, "none") == 0  # a tie goes to the first


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_perplexity_and_downstream(setup: dict, capsys: pytest.CaptureFixture) -> None:
    root, tok, ckpt = setup["root"], setup["tokenizer_path"], setup["ckpt"]
    folder = write_docs(root / "cli-docs")
    out = root / "ppl.json"
    code, stdout, err = run_main(capsys, "perplexity", ckpt, folder, "--tokenizer", tok, "--out", out, "--no-progress")
    assert (code, err) == (0, "")
    written = json.loads(out.read_text())
    assert written["command"] == "perplexity" and written["dtype"] == "float32" and written["world_size"] == 1
    assert set(stdout.split()) >= {"web", "wiki", "overall"}  # one line per source; domains are in the JSON
    assert set(written["groups"]) == {"web/news", "web/blogs", "wiki"}
    from megaolmo.data import iter_documents

    api = score_documents(setup["model"], setup["tokenizer"], iter_documents([folder]))
    assert written["overall"]["nll"] == pytest.approx(api["overall"]["nll"], abs=1e-9)

    task = simple_task(root / "cli_qa.jsonl")
    out = root / "down.json"
    code, stdout, err = run_main(capsys, "downstream", ckpt, task, "--tokenizer", tok, "--out", out, "--no-progress")
    assert (code, err) == (0, "")
    written = json.loads(out.read_text())
    assert written["tasks"]["cli_qa"]["examples"] == 6
    assert "cli_qa" in stdout and "average" in stdout


def bad_task(root: Path, case: str) -> tuple[Path, str]:
    """A broken task file and the words its error line must contain."""
    good = json.dumps({"context": "Q", "choices": [" a", " b"], "label": 0})
    path = root / f"{case}.jsonl"
    if case == "missing":
        return root / "nowhere.jsonl", "does not exist"
    if case == "bad-json":
        path.write_text(f"{good}\n{good}\n{{'context': 1\n")
        return path, f"{path}:3: not valid JSON"
    if case == "label-out-of-range":
        path.write_text(good + "\n" + json.dumps({"context": "Q", "choices": [" a", " b"], "label": 2}) + "\n")
        return path, f"{path}:2: label 2 is out of range for 2 choices"
    if case == "no-choices":
        path.write_text(json.dumps({"context": "Q", "choices": [], "label": 0}) + "\n")
        return path, f"{path}:1: no choices"
    if case == "olmo-idx-gap":
        request = {"request_type": "loglikelihood", "request": {"context": "Q", "continuation": " a"}, "label": 0}
        path.write_text(json.dumps(request | {"doc_id": 0, "idx": 1}) + "\n")
        return path, "doc_id 0 has choices idx [1]"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "bad-json", "label-out-of-range", "no-choices", "olmo-idx-gap"])
def test_bad_task_files_get_one_error_line(setup: dict, capsys: pytest.CaptureFixture, case: str) -> None:
    root = setup["root"] / f"bad-{case}"
    root.mkdir()
    path, words = bad_task(root, case)
    out = root / "results.json"
    code, stdout, err = run_main(
        capsys, "downstream", setup["ckpt"], path, "--tokenizer", setup["tokenizer_path"], "--out", out
    )
    assert code == 2 and stdout == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err
    assert not out.exists()


def test_torchrun_data_parallel_equals_one_process(setup: dict) -> None:
    """Two gloo ranks split the documents and the examples; the totals equal one process's."""
    root, tok, ckpt = setup["root"], setup["tokenizer_path"], setup["ckpt"]
    folder = write_docs(root / "dp-docs")
    task = simple_task(root / "dp_qa.jsonl")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megaolmo.eval"]
    for name, args in (("ppl", ["perplexity", ckpt, folder]), ("down", ["downstream", ckpt, task])):
        out = root / f"dp-{name}.json"
        command = [*torchrun, *map(str, args), "--tokenizer", str(tok), "--out", str(out), "--no-progress"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert_ok(result, tail=2000)
        written = json.loads(out.read_text())
        assert written["world_size"] == 2
        if name == "ppl":
            from megaolmo.data import iter_documents

            single = score_documents(setup["model"], setup["tokenizer"], iter_documents([folder]))
            for group, summary in single["groups"].items():
                assert written["groups"][group] == pytest.approx(summary)
        else:
            single = evaluate_tasks(setup["model"], setup["tokenizer"], load_tasks([task]))
            assert written["tasks"]["dp_qa"]["accuracy_by_normalization"] == pytest.approx(
                single["tasks"]["dp_qa"]["accuracy_by_normalization"]
            )
