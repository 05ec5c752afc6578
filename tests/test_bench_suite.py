"""`python -m megaolmo.bench suite`: on CPU every part runs at tiny shapes, and a failing part stops none after it."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from megaolmo.bench.suite import PARTS


def run_suite(out: Path, *args: str) -> subprocess.CompletedProcess:
    """The suite at its CPU shapes, on any machine: a GPU, if there is one, is hidden from it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "megaolmo.bench", "suite", "--out", str(out), *args]
    return subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=290, check=False)


def statuses(summary: str) -> dict[str, str]:
    """Each part's status from summary.md's table."""
    return dict(re.findall(r"^\| (\S+) \| (ok|failed|skipped|timed out) \|", summary, re.MULTILINE))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_suite_runs_every_part_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    result = run_suite(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert statuses(summary) == dict.fromkeys(PARTS, "ok")
    assert "- GPU: none (CPU" in summary and f"torch {torch.__version__}" in summary and "hydra-core " in summary
    assert all((out / f"{name}.csv").is_file() for name in PARTS)
    environment = {row["key"]: row["value"] for row in read_csv(out / "environment.csv")}
    assert environment["torch"] == torch.__version__ and environment["nccl"] == "n/a"
    gpu_tests = {row["outcome"]: int(row["tests"]) for row in read_csv(out / "gpu-tests.csv")}
    assert gpu_tests["skipped"] > 0 and "passed" not in gpu_tests  # without CUDA every GPU test skips
    assert {row["check"] for row in read_csv(out / "kernels.csv")} == {"ok"}
    assert read_csv(out / "step.csv")[0]["implementation"] == "megaolmo torch"
    train = read_csv(out / "train.csv")
    assert [int(row["step"]) for row in train] == list(range(1, 7))  # two legs: 1-3, then resumed at 3
    assert math.isfinite(float(train[-1]["loss"])) and "final loss" in summary


def test_a_failing_part_is_reported_and_the_next_still_runs(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    result = run_suite(out, "--only", "environment,kernels,step", "--extra", "kernels=--no-such-option")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert statuses(summary) == {"environment": "ok", "kernels": "failed", "step": "ok"}
    assert "unrecognized arguments: --no-such-option" in summary and "[exit status 2]" in summary
    assert (out / "step.csv").is_file() and not (out / "train.csv").exists()


def test_unknown_part_is_one_error_line(tmp_path: Path) -> None:
    result = run_suite(tmp_path / "suite", "--only", "kernels,nope")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --only kernels,nope: name parts from environment,gpu-tests,kernels,step,train, separated by commas"
    ]
