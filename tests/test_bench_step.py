"""`python -m megaolmo.bench step`: every implementation this machine has, in one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from bench_rows import assert_well_formed

from megaolmo.model.fp8 import has_fp8_gemm

COLUMNS = [
    "implementation", "step s", "tokens/s", "TFLOP/s", "MFU %", "speed vs megaolmo torch", "peak GiB", "step peak MiB",
]  # fmt: skip


def test_step_benchmark_compares_linears_and_transformers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "megaolmo.bench", "step", "--layers", "1", "--seq-len", "64",
               "--steps", "2", "--warmup", "1", "--peak-tflops", "1", "--out", "rows.json"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    notes = {row["implementation"]: row["note"] for row in rows if "note" in row}
    assert notes == {
        "megaolmo torchao, FP8 all-gather": "skipped: needs data parallelism (torchrun, dp > 1)",
        "megaolmo torch, context parallelism": "skipped: needs several data-parallel ranks (torchrun)",
    }
    rows = [row for row in rows if "note" not in row]
    names = [row["implementation"] for row in rows]
    fp8_gemm = torch.cuda.is_available() and has_fp8_gemm(torch.device("cuda", 0))
    torchao = "megaolmo torchao" if fp8_gemm else "megaolmo torchao (emulated FP8)"  # never read as FP8 speed
    assert names[:2] == ["megaolmo torch", "transformers"] and torchao in names
    assert "megaolmo torch, loss 1024 tokens at a time" in names
    assert_well_formed(rows, COLUMNS, COLUMNS[1:])  # figures, not speeds: any machine passes
    assert rows[0]["speed vs megaolmo torch"] == 1.0
