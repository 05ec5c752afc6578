"""The README's parallel training example runs as written, under torchrun on 4 CPU ranks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import assert_ok

README = Path(__file__).resolve().parent.parent / "README.md"


def test_parallel_step_example_runs_under_torchrun(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("### A parallel training step") :]
    script = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    (tmp_path / "step.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "step.py"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert_ok(result, tail=2000)
    losses = [float(m) for m in re.findall(r"step \d: loss ([\d.]+)", result.stdout)]
    assert len(losses) == 3 and losses[2] < losses[0]
