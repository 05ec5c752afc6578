"""`python -m megaolmo.train` end to end: layouts give the same losses, outputs are written, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_ok
from training_run import TINY, VOCAB, data_args, losses, train

from megaolmo.checkpoint.directory import MANIFEST_FILE


def test_single_process_and_tp2_pp2_dp2_give_the_same_losses(dataset, tmp_path: Path) -> None:
    tasks = [f"trainer.downstream_tasks=[{dataset['task']}]"]
    single = train([*TINY, *data_args(dataset), *tasks], tmp_path / "single")
    assert_ok(single)
    layout = train([*TINY, *data_args(dataset), *tasks, "parallel=tp2_pp2_dp2"], tmp_path / "tp2_pp2_dp2", ranks=8)
    assert_ok(layout)
    expected, got = losses(tmp_path / "single"), losses(tmp_path / "tp2_pp2_dp2")
    assert len(expected) == 5 and expected[-1] < expected[0]
    for a, b in zip(got, expected):
        assert abs(a - b) <= 1e-5 * b, (got, expected)
    evals = []
    for run in ("single", "tp2_pp2_dp2"):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        step5 = next(r for r in records if r["step"] == 5 and "loss" in r)
        assert {"lr", "grad_norm", "tokens", "tokens_per_second", "mfu", "eval/web/bits_per_byte"} <= set(step5)
        evals.append({k: v for k, v in step5.items() if k.startswith("eval/")})
        assert (tmp_path / run / "loss.png").stat().st_size > 0
        assert (tmp_path / run / "final" / MANIFEST_FILE).is_file()
    # The held-out loss and the downstream accuracy (the same evaluators) agree across layouts too.
    assert evals[0].keys() == evals[1].keys() and "eval/downstream/synthetic/accuracy" in evals[0]
    for key, value in evals[0].items():
        assert abs(evals[1][key] - value) <= 1e-5 * max(abs(value), 1.0), key


def test_final_weights_load_with_megaolmo_load(dataset, tmp_path: Path) -> None:
    import torch

    import megaolmo

    result = train([*TINY, *data_args(dataset), "trainer.max_steps=2", "trainer.precision=bf16"], tmp_path / "run")
    assert_ok(result)
    model = megaolmo.load(tmp_path / "run" / "final")
    logits = model(torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 4, VOCAB) and torch.isfinite(logits).all()
    assert "final loss" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.paths=[/nonexistent/data]"], "/nonexistent/data"),
        (["model.vocab_size=256"], "vocab"),
        (["trainer.seq_len=128"], "trainer.seq_len=128 exceeds model.max_sequence_length=64"),
        (["trainer.global_batch_size=9"], "trainer.global_batch_size=9 is not divisible by"),
        (["model.n_heads=3"], "model.d_model=64 is not divisible by model.n_heads=3"),
    ],
)
def test_bad_input_is_one_clear_line(dataset, tmp_path: Path, args: list[str], message: str) -> None:
    result = train([*TINY, *data_args(dataset), *args], tmp_path / "run")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "run" / "final").exists()


def test_tokenizer_mismatch_is_refused(dataset, tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(dataset["tokenizer"].read_text().replace("<|padding|>", "<|pad|>"))
    args = [*TINY, *data_args(dataset)[:-1], f"data.tokenizer={other}"]
    result = train(args, tmp_path / "run")
    assert result.returncode == 2 and "tokenizer" in result.stderr


def test_world_size_mismatch_names_the_torchrun_line(dataset, tmp_path: Path) -> None:
    result = train([*TINY, *data_args(dataset), "parallel=tp2_pp2_dp2"], tmp_path / "run", env={"WORLD_SIZE": "4"})
    assert result.returncode == 2
    assert "torchrun --nproc-per-node 8 -m megaolmo.train" in result.stderr


def test_unknown_key_and_wrong_type_fail_at_compose_time(tmp_path: Path) -> None:
    unknown = train(["trainer.max_stepz=3"], tmp_path / "a")
    assert unknown.returncode != 0 and "max_stepz" in unknown.stderr
    wrong = train(["trainer.max_steps=many"], tmp_path / "b")
    assert wrong.returncode != 0 and "max_steps" in wrong.stderr
    misspelt = train(["experiment=olmo_7", "--cfg", "job"], tmp_path / "c")  # never falls back to the tiny model
    assert misspelt.returncode != 0 and "Could not find 'experiment/olmo_7'" in misspelt.stderr


def test_cfg_job_prints_the_resolved_experiment(tmp_path: Path) -> None:
    result = train(["experiment=olmo_7b", "--cfg", "job"], tmp_path / "cfg")
    assert_ok(result)
    assert "d_model: 4096" in result.stdout and "lr: 0.0003" in result.stdout and "scheduler: linear" in result.stdout
