"""Sharded checkpoints: exact resume, resharding across layouts, crashes and damage never lose progress."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_ok
from training_run import TINY, VOCAB, data_args, losses, stop_after, train, train_command

import megaolmo
from megaolmo.checkpoint.directory import MANIFEST_FILE

STEPS = ["trainer.max_steps=6", "trainer.eval_interval=0"]


def checkpoints(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def run(dataset, run_dir: Path, *args: str, ranks: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    result = train([*TINY, *STEPS, *data_args(dataset), *args], run_dir, ranks=ranks, env=env)
    return result


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """Losses of a run of 6 steps in one go (single process)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = run(dataset, run_dir)
    assert_ok(result)
    return losses(run_dir)


def test_stop_at_and_resume_are_bitwise_exact(dataset, straight: list[float], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run(dataset, run_dir, "trainer.stop_at=3")
    assert_ok(first)
    assert (checkpoints(run_dir) / "latest").read_text().strip() == "step000003"
    assert not (run_dir / "final").exists()  # the run is not over
    second = run(dataset, run_dir)
    assert_ok(second)
    assert "resumed from" in second.stdout
    assert losses(run_dir) == straight  # bitwise: fp32 on CPU, same layout


@pytest.fixture(scope="module")
def tp2_pp2_dp2_run(dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps under tp2_pp2_dp2 with ZeRO-2, evaluated and then checkpointed at step 2, as the recipes
    do (8 ranks: started once for the tests below)."""
    run_dir = tmp_path_factory.mktemp("tp2_pp2_dp2") / "run"
    zero2_eval = ["parallel=tp2_pp2_dp2", "parallel.reshard_after_forward=false", "trainer.eval_interval=2"]
    result = train([*TINY, "trainer.max_steps=6", *data_args(dataset), *zero2_eval, "trainer.stop_at=2"], run_dir,
                   ranks=8)  # fmt: skip
    assert_ok(result)
    return run_dir


def test_sharded_checkpoint_consolidates_and_loads(tp2_pp2_dp2_run: Path, tmp_path: Path) -> None:
    checkpoint = checkpoints(tp2_pp2_dp2_run) / "step000002"  # only read here
    out = tmp_path / "consolidated"
    convert = subprocess.run(
        [sys.executable, "-m", "megaolmo.convert", "consolidate", str(checkpoint), str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert_ok(convert)
    sharded, consolidated = megaolmo.load(checkpoint), megaolmo.load(out)
    for (name, a), b in zip(sharded.state_dict().items(), consolidated.state_dict().values()):
        assert torch.equal(a, b), name
    hf = subprocess.run(
        [sys.executable, "-m", "megaolmo.convert", "to-hf", str(checkpoint), str(tmp_path / "hf")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert_ok(hf)


def test_resume_on_other_layouts(dataset, straight: list[float], tp2_pp2_dp2_run: Path, tmp_path: Path) -> None:
    """tp2_pp2_dp2 -> tp4_pp1_dp2 -> one process, each leg resharding the previous leg's checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(tp2_pp2_dp2_run, run_dir)  # the first leg, to step 2
    legs = [
        (["parallel=tp4_pp1_dp2", "trainer.stop_at=4"], 8),
        ([], 1),
    ]
    for args, ranks in legs:
        result = run(dataset, run_dir, *args, ranks=ranks)
        assert_ok(result)
    got = losses(run_dir)
    assert len(got) == len(straight)
    for a, b in zip(got, straight):
        assert abs(a - b) <= 1e-5 * b, (got, straight)


OLMO3 = [
    "model.arch=olmo3", "model.sliding_window=8", "model.layer_norm_eps=1e-6", "model.rope_theta=500000",
    "model.n_kv_heads=2", "model.weight_tying=false", "trainer.eval_interval=3",
]  # fmt: skip


def held_out(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [value for r in records for key, value in sorted(r.items()) if key.startswith("eval/")]


def assert_trains_like(run_dir: Path, straight_dir: Path) -> None:
    """The losses and the in-loop held-out metrics of a run in legs are those of the straight run, to 1e-5."""
    got, want = losses(run_dir), losses(straight_dir)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-5 * b, (got, want)
    evaluated, expected = held_out(run_dir), held_out(straight_dir)
    assert len(evaluated) == len(expected) > 0
    for a, b in zip(evaluated, expected):
        assert abs(a - b) <= 1e-5 * abs(b), (evaluated, expected)


def test_olmo3_resumes_resharded(dataset, tmp_path: Path) -> None:
    """An OLMo-3 model (norm weights replicated over TP, QK-norm weights split by head, sliding windows) saved
    under tp2 (sequence parallel) x pp2 x dp2 resumes on one process with the losses of a run straight through."""
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "run"
    assert_ok(run(dataset, straight_dir, *OLMO3))
    assert_ok(run(dataset, run_dir, *OLMO3, "parallel=tp2_pp2_dp2", "trainer.stop_at=3", ranks=8))
    resumed = run(dataset, run_dir, *OLMO3)
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout
    assert_trains_like(run_dir, straight_dir)  # in-loop held-out metrics at steps 3 and 6
    assert megaolmo.load(run_dir / "final").config.arch == "olmo3"


OLMO2_FROM_HF = [
    "model.arch=olmo2", "model.n_kv_heads=2", "model.layer_norm_eps=1e-6", "model.rope_theta=500000",
    "model.weight_tying=false", "trainer.max_steps=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def converted_olmo2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random transformers Olmo2ForCausalLM of the tiny run's shapes, converted by `convert from-hf`."""
    import transformers

    root = tmp_path_factory.mktemp("olmo2_hf")
    hf_config = transformers.Olmo2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(3)
    model = transformers.Olmo2ForCausalLM(hf_config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    model.save_pretrained(root / "hf")
    converted = subprocess.run(
        [sys.executable, "-m", "megaolmo.convert", "from-hf", str(root / "hf"), str(root / "converted")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert_ok(converted)
    return root / "converted"


def test_initialize_weights_reads_each_share(converted_olmo2: Path) -> None:
    """One process: every parameter equals the converted tensor; the optimizer is untouched (fresh)."""
    from megaolmo.checkpoint.initialize import initialize_weights
    from megaolmo.config import ModelConfig, ParallelConfig
    from megaolmo.model.engine import ParallelOLMo

    saved, state = megaolmo.checkpoint.load_consolidated(converted_olmo2)
    config = ModelConfig(**{**saved.to_dict(), "kernels": "torch", "max_sequence_length": 32})
    model = ParallelOLMo(config, ParallelConfig(device="cpu"), seed=0)
    assert initialize_weights(converted_olmo2, model) == ["max_sequence_length=64 (now 32)"]
    for name, tensor in model.full_tensors().items():
        assert torch.equal(tensor, state[name]), name


def test_init_from_a_converted_model_on_any_layout(dataset, converted_olmo2: Path, tmp_path: Path) -> None:
    """A converted Olmo2ForCausalLM starts a run on one process and on tp2 (SP) x pp2 x dp2 with the same
    losses, not those of a fresh initialization; a model of other shapes is refused in one line."""
    init = [*OLMO2_FROM_HF, f"trainer.init_from={converted_olmo2}"]
    single, parallel, fresh = tmp_path / "single", tmp_path / "parallel", tmp_path / "fresh"
    result = run(dataset, single, *init)
    assert_ok(result)
    assert f"initialized the weights from {converted_olmo2}" in result.stdout
    assert_ok(run(dataset, parallel, *init, "parallel=tp2_pp2_dp2", ranks=8))
    assert_ok(run(dataset, fresh, *OLMO2_FROM_HF))
    for a, b in zip(losses(parallel), losses(single)):
        assert abs(a - b) <= 1e-5 * b, (losses(parallel), losses(single))
    assert abs(losses(single)[0] - losses(fresh)[0]) > 1e-3
    refused = run(dataset, tmp_path / "refused", *init, "model.n_kv_heads=4")
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds another model's weights: n_kv_heads=2 (now 4)" in errors[0], refused.stderr
    missing = run(dataset, tmp_path / "missing", *OLMO2_FROM_HF, f"trainer.init_from={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and "trainer.init_from=" in missing.stderr and "is not a directory" in missing.stderr


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(dataset, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    bigger = ["model.d_model=256", "model.ffn_hidden_size=1024", "trainer.max_steps=40", "trainer.save_interval=1"]
    command = train_command([*TINY, *data_args(dataset), "trainer.eval_interval=0", *bigger], run_dir)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed = time.time() + 240, False
    while time.time() < deadline and process.poll() is None:
        directory = checkpoints(run_dir)
        committed = list(directory.glob("step*")) if directory.is_dir() else []
        if committed and list(directory.glob(".step*.tmp")):
            process.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.001)
    process.wait()
    assert killed, "the run ended before a save could be interrupted"
    latest = (checkpoints(run_dir) / "latest").read_text().strip()
    assert (checkpoints(run_dir) / latest / MANIFEST_FILE).is_file()
    resumed = train([*TINY, *data_args(dataset), "trainer.eval_interval=0", *bigger[:3]], run_dir)
    assert_ok(resumed)
    assert f"resumed from {checkpoints(run_dir) / latest}" in resumed.stdout
    assert not list(checkpoints(run_dir).glob(".step*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "delete"])
def test_damaged_checkpoint_is_refused_in_one_line(dataset, tmp_path: Path, damage: str) -> None:
    run_dir = tmp_path / "run"
    assert_ok(run(dataset, run_dir, "trainer.stop_at=2"))
    shard = next((checkpoints(run_dir) / "step000002").glob("__0_*.distcp"))
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "corrupt":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    result = run(dataset, run_dir, f"trainer.resume={checkpoints(run_dir) / 'step000002'}")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = {"truncate": "truncated", "corrupt": "corrupted", "delete": "is missing"}[damage]
    assert len(errors) == 1 and shard.name in errors[0] and expected in errors[0], result.stderr[-2000:]


def test_checkpoint_of_another_model_is_refused(dataset, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert_ok(run(dataset, run_dir, "trainer.stop_at=2"))
    result = run(dataset, run_dir, "model.n_layers=2")
    assert result.returncode == 2
    assert "was saved from a different model: n_layers=4 (now 2)" in result.stderr


def _disk_quota(limit_bytes: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def test_full_disk_fails_the_save_and_keeps_everything(dataset, straight: list[float], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert_ok(run(dataset, run_dir, "trainer.stop_at=2"))
    before = {p.name: p.read_bytes() for p in (checkpoints(run_dir) / "step000002").iterdir()}
    command = train_command(
        [*TINY, *STEPS, *data_args(dataset), "trainer.stop_at=4", "trainer.tensorboard=false"], run_dir
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full = subprocess.run(
        command, capture_output=True, text=True, check=False, env=env, preexec_fn=_disk_quota(200_000)
    )
    assert full.returncode == 2, full.stderr[-2000:]
    assert "saving checkpoint step000004 failed" in full.stderr and "the previous one is untouched" in full.stderr
    assert (checkpoints(run_dir) / "latest").read_text().strip() == "step000002"
    assert {p.name: p.read_bytes() for p in (checkpoints(run_dir) / "step000002").iterdir()} == before
    assert not list(checkpoints(run_dir).glob(".step*"))
    again = run(dataset, run_dir)
    assert_ok(again)
    assert losses(run_dir) == straight


def test_retention_keeps_the_last_k_and_every_mth(dataset, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run(dataset, run_dir, "trainer.save_interval=1", "trainer.keep_last=2", "trainer.keep_every=3")
    assert_ok(result)
    kept = sorted(p.name for p in checkpoints(run_dir).iterdir() if p.is_dir())
    assert kept == ["step000003", "step000005", "step000006"]
    state = json.loads((checkpoints(run_dir) / "step000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data"]["samples_seen"] == 6 * 8
    shutil.rmtree(run_dir)


def test_sigterm_saves_after_the_step_in_flight_and_resumes_exactly(dataset, tmp_path: Path) -> None:
    """A scheduler's stop signal costs no progress: a checkpoint at the step boundary, exit 75, exact resume."""
    run_dir = tmp_path / "run"
    long = ["trainer.max_steps=30", "trainer.eval_interval=0"]
    command = train_command([*TINY, *data_args(dataset), *long], run_dir)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = stop_after(process, run_dir, steps=2)
    assert process.returncode == 75, stderr[-3000:]
    stopped_at = len(losses(run_dir))
    assert stopped_at < 30, "the run finished before the signal arrived"
    assert f"stop signal (SIGTERM) after step {stopped_at}" in stderr
    assert (checkpoints(run_dir) / "latest").read_text().strip() == f"step{stopped_at:06d}"
    resumed = train([*TINY, *data_args(dataset), *long], run_dir)
    assert_ok(resumed)
    straight_dir = tmp_path / "straight"
    straight = train([*TINY, *data_args(dataset), *long], straight_dir)
    assert_ok(straight)
    assert losses(run_dir) == losses(straight_dir)


def test_context_parallel_checkpoint_resumes_on_one_process_and_back(dataset, tmp_path: Path) -> None:
    """OLMo-3 with document masking saved under cp2 x tp2 (sequence parallel) resumes on one process, whose
    checkpoint resumes under cp2 x tp2 again: the losses and the held-out metrics (evaluated in the loop under
    CP at steps 2 and 6, on one process at step 4) are those of a run straight through on one process."""
    args = [*(arg for arg in OLMO3 if not arg.startswith("trainer.eval_interval")), "trainer.eval_interval=2",
            "data.document_masking=true"]  # fmt: skip
    context_parallel = ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"]
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "run"
    assert_ok(run(dataset, straight_dir, *args))
    assert_ok(run(dataset, run_dir, *args, *context_parallel, "trainer.stop_at=2", ranks=4))
    assert_ok(run(dataset, run_dir, *args, "trainer.stop_at=4"))
    resumed = run(dataset, run_dir, *args, *context_parallel, ranks=4)
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout
    assert_trains_like(run_dir, straight_dir)
