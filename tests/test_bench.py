"""`python -m megaolmo.bench kernels`: the CPU fallback, the report, and (on a GPU) a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench_rows import assert_well_formed

from megaolmo.tables import format_table, write_rows


def run_bench(*args: str, cwd: Path, hide_gpu: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "megaolmo.bench", *args]
    return subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_without_a_gpu_it_says_so_and_smoke_checks_the_kernels(tmp_path: Path) -> None:
    result = run_bench("kernels", cwd=tmp_path, hide_gpu=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("no CUDA GPU")
    assert [line.split()[0] for line in lines[1:]] == ["layer_norm", "rms_norm", "swiglu", "rope"]
    assert all(line.endswith("ok") for line in lines[1:])


def test_bad_out_suffix_is_refused(tmp_path: Path) -> None:
    result = run_bench("kernels", "--out", "table.txt", cwd=tmp_path)
    assert result.returncode == 2
    assert "--out table.txt: use a .csv or .json file name" in result.stderr


def test_table_and_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [{"op": "rope", "ms": 0.5, "x torch": 2.0}, {"op": "swiglu", "ms": 1.25, "peak MiB": 3.0}]
    table = format_table(rows).splitlines()
    assert table[0].split() == ["op", "ms", "x", "torch", "peak", "MiB"]
    assert table[2].split() == ["rope", "0.5", "2.0", "-"]
    assert table[3].split() == ["swiglu", "1.25", "-", "3.0"]
    write_rows(rows, str(tmp_path / "rows.json"))
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    write_rows(rows, str(tmp_path / "rows.csv"))
    csv_lines = (tmp_path / "rows.csv").read_text().splitlines()
    assert csv_lines[0] == "op,ms,x torch,peak MiB" and csv_lines[2] == "swiglu,1.25,,3.0"
    assert "rope" in capsys.readouterr().out


@pytest.mark.gpu
def test_gpu_run_reports_every_op_and_mode(tmp_path: Path) -> None:
    result = run_bench("kernels", "--tokens", "2048", "--out", "rows.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {(row["op"], row["mode"]) for row in rows} == {
        (op, mode)
        for op in ("layer_norm", "rms_norm", "swiglu", "rope")
        for mode in ("forward", "backward", "forward+backward")
    }
    columns = ["op", "shape", "mode", "ms", "GB/s", "%copy"]
    figures = ["ms", "GB/s", "%copy"]
    for row in rows:
        assert list(row)[: len(columns)] == columns and "x torch.compile" in row
        extra = [key for key in row if key.startswith(("x ", "peak MiB"))]
        assert_well_formed([row], columns + extra, figures + extra)
        assert ("peak MiB" in row) == (row["mode"] == "forward+backward")
