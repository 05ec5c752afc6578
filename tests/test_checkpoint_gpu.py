"""Checkpoints on NCCL, one GPU: `torchrun --nproc-per-node 1` runs the distributed path (a process group,
FSDP, every collective on the GPU) through in-loop evaluation, downstream tasks, a save, a stop signal,
a resume, the final weights and `convert consolidate` (skipped without CUDA)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_ok
from training_run import TINY, data_args, stop_after, train_command

import megaolmo
from megaolmo.checkpoint.directory import MANIFEST_FILE

pytestmark = pytest.mark.gpu

ON_GPU = ["parallel.device=cuda", "parallel=fsdp_zero2", "trainer.precision=bf16", "trainer.max_steps=12",
          "trainer.eval_interval=3", "trainer.save_interval=3"]  # fmt: skip


def test_nccl_save_stop_resume_final_and_consolidate(dataset, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*TINY, *data_args(dataset), *ON_GPU, f"trainer.downstream_tasks=[{dataset['task']}]"]
    command = train_command(args, run_dir)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", *command[1:]]
    process = subprocess.Popen(torchrun, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = stop_after(process, run_dir, steps=4, timeout=300)
    assert process.returncode == 75, stderr[-3000:]
    assert "stop signal (SIGTERM)" in stderr
    resumed = subprocess.run(torchrun, capture_output=True, text=True, timeout=600, check=False)
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout
    assert (run_dir / "final" / MANIFEST_FILE).is_file()
    records = (run_dir / "metrics.jsonl").read_text()
    assert "eval/" in records and "downstream" in records
    out = tmp_path / "consolidated"
    convert = subprocess.run([sys.executable, "-m", "megaolmo.convert", "consolidate", str(run_dir / "final"),
                              str(out)], capture_output=True, text=True, check=False)  # fmt: skip
    assert_ok(convert)
    final, consolidated = megaolmo.load(run_dir / "final"), megaolmo.load(out)
    for (name, a), b in zip(final.state_dict().items(), consolidated.state_dict().values()):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
