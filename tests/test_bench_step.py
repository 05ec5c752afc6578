"""`python -m megaolmo.bench step`: every implementation this machine has, in one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_step_benchmark_compares_linears_and_transformers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "megaolmo.bench", "step", "--layers", "1", "--seq-len", "64",
               "--steps", "2", "--warmup", "1", "--peak-tflops", "1", "--out", "rows.json"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    names = [row["implementation"] for row in rows]
    assert names[:2] == ["megaolmo torch", "transformers"] and "megaolmo torchao" in names
    assert all(row["tokens/s"] > 0 and row["TFLOP/s"] > 0 for row in rows)
    assert rows[0]["speed vs megaolmo torch"] == 1.0
