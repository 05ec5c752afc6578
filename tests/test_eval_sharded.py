"""`python -m megaolmo.eval --tp N --pp N`: a checkpoint evaluated on a model sharded as in training gives one
process's numbers (perplexity per group, every downstream choice's log-probability), on CPU gloo ranks."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from data_fixtures import small_tokenizer, write_dolma
from eval_worker import Layout, run_layouts
from gloo_groups import spawn
from helpers import small_model

import megaolmo
from megaolmo.checkpoint import save_consolidated
from megaolmo.data import iter_documents, load_tokenizer
from megaolmo.eval import evaluate_tasks, load_tasks, score_documents
from megaolmo.eval.__main__ import main

CONTEXT = 32
LAYOUTS = [
    Layout("tp2_pp2", tp=2, pp=2, world_size=4),
    Layout("tp2_dp2", tp=2, pp=1, world_size=4),
    Layout("cp2_tp2", tp=2, pp=1, cp=2, world_size=4),
]
TEXT = "the quick brown fox jumps over the lazy dog and the data tokens model "


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eval-sharded")
    tokenizer = small_tokenizer(root / "tokenizer.json", vocab_size=300)
    config = small_model(ffn_hidden_size=128, vocab_size=300, max_sequence_length=CONTEXT)
    model = megaolmo.build_model(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # log-probabilities far apart, so a wrong shard cannot pass for rounding
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    save_consolidated(root / "ckpt", config, model.state_dict())
    docs = [
        {"id": "short", "text": "The quick brown fox.", "source": "web"},
        {"id": "long", "text": TEXT * 6, "source": "web"},  # several windows of the 32-token context
        {"id": "wiki", "text": "A lazy dog naps.", "source": "wiki"},
    ]
    write_dolma(root / "docs" / "docs.jsonl", docs)
    examples = [
        {"context": "The quick brown", "choices": [" fox", " dog", " model"], "label": 0},
        {"context": "jumps over the", "choices": [" lazy dog", " data"], "label": 0},
        {"context": TEXT * 3, "choices": [" the", " fox"], "label": 1},  # cut from the left to fit
    ]
    task = root / "qa.jsonl"
    task.write_text("".join(json.dumps(example) + "\n" for example in examples))
    inputs = {"checkpoint": root / "ckpt", "tokenizer": tokenizer, "documents": root / "docs", "task": task}
    inputs = {key: str(value) for key, value in inputs.items()}
    spawn(run_layouts, ([dataclasses.asdict(layout) for layout in LAYOUTS], inputs, str(root / "out")), 4)
    return {
        "root": root,
        "inputs": inputs,
        "model": megaolmo.load(root / "ckpt"),
        "tokenizer": load_tokenizer(tokenizer),
    }


def written(setup: dict, layout: Layout, command: str) -> dict:
    folder = setup["root"] / "out" / layout.name
    errors = sorted(folder.glob("rank*.error"))
    if errors:
        pytest.fail(errors[0].read_text())
    return json.loads((folder / f"{command}.json").read_text())


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_sharded_perplexity_equals_one_process(setup: dict, layout: Layout) -> None:
    results = written(setup, layout, "perplexity")
    dp = layout.world_size // (layout.tp * layout.pp * layout.cp)
    assert results["layout"] == {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": dp}
    documents = iter_documents([setup["inputs"]["documents"]])
    single = score_documents(setup["model"], setup["tokenizer"], documents, per_document=True)
    assert set(results["groups"]) == set(single["groups"]) == {"web", "wiki"}
    for group, summary in single["groups"].items():
        assert results["groups"][group] == pytest.approx(summary, rel=1e-5)
    for got, want in zip(results["documents"], single["documents"], strict=True):
        assert got["id"] == want["id"] and got["tokens"] == want["tokens"]
        assert got["nll"] == pytest.approx(want["nll"], rel=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_sharded_downstream_equals_one_process(setup: dict, layout: Layout) -> None:
    results = written(setup, layout, "downstream")
    tasks = load_tasks([setup["inputs"]["task"]])
    single = evaluate_tasks(setup["model"], setup["tokenizer"], tasks, per_example=True)
    mine, theirs = results["tasks"]["qa"], single["tasks"]["qa"]
    assert mine["accuracy_by_normalization"] == pytest.approx(theirs["accuracy_by_normalization"])
    assert mine["examples"] == theirs["examples"] == 3
    for got, want in zip(mine["per_example"], theirs["per_example"], strict=True):
        assert got["logprobs"] == pytest.approx(want["logprobs"], rel=1e-5)
        assert got["uncond_logprobs"] == pytest.approx(want["uncond_logprobs"], rel=1e-5)


def test_a_layout_that_does_not_divide_the_ranks_is_one_error_line(setup: dict, capsys) -> None:
    inputs = setup["inputs"]
    args = ["perplexity", inputs["checkpoint"], inputs["documents"], "--tokenizer", inputs["tokenizer"], "--tp", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "--tp 2 x --pp 1 = 2 does not divide the 1 ranks" in err
