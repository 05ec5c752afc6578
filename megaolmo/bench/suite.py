"""`python -m megaolmo.bench suite --out DIR`: every benchmark and GPU check in one run, ready for BENCHMARKS.md.

The parts run in order, each as a subprocess with its own time budget, so a crash, a hang or an
out-of-memory in one is reported (with the last lines of its output) and the next part still runs:

    environment  GPU, driver, CUDA, torch, Triton, NCCL and the optional packages' versions
    gpu-tests    pytest -m gpu, from the checkout's tests/ (skipped when megaolmo is not a checkout)
    kernels      python -m megaolmo.bench kernels at OLMo-7B shapes in bf16
    step         python -m megaolmo.bench step at OLMo-1B shapes, every linear backend and transformers
    train        python -m megaolmo.train experiment=olmo_1b, shrunk to one GPU, under a one-rank
                 torchrun (NCCL, FSDP), in two legs: the second resumes from the first's checkpoint

It is budgeted for about 8 minutes on one H100/H200. Without a GPU the same parts run at tiny shapes on CPU in
under 3 minutes on 2 cores (the kernels through Triton's interpreter, pytest skipping every test), so
CI exercises the suite itself. DIR gets summary.md (the block to paste), one CSV per part and each
part's full output as <part>.log. Exit status 0 when every part was ok or skipped, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megaolmo.errors import MegaolmoError
from megaolmo.tables import write_csv

PARTS = ("environment", "gpu-tests", "kernels", "step", "train")
# Seconds each part may take (GPU, CPU): caps, well above what a healthy run needs.
BUDGETS = {
    "environment": (60, 60),
    "gpu-tests": (180, 90),
    "kernels": (150, 60),
    "step": (180, 60),
    "train": (240, 120),
}
# Distribution name -> the module it installs, for installs without metadata.
OPTIONAL_PACKAGES = {
    "transformer_engine": "transformer_engine",
    "torchao": "torchao",
    "flash_attn": "flash_attn",
    "transformers": "transformers",
    "hydra-core": "hydra",
    "omegaconf": "omegaconf",
}
TAIL_LINES = 25  # output lines kept in summary.md for a part that did not finish ok
CHECKOUT = Path(__file__).resolve().parents[2]  # the folder holding megaolmo/ (and tests/ in a checkout)


@dataclass
class Part:
    """One part's record: what ran, how it ended, how long it took and the figures worth a glance."""

    name: str
    status: str = "ok"  # ok | failed | skipped | timed out
    commands: list[str] = field(default_factory=list)
    seconds: float = 0.0
    headline: str = ""
    tail: str = ""  # the last lines of output, kept when the part did not end ok


@dataclass
class Suite:
    """What every part needs: where to write, GPU or CPU (the shapes and budgets), extra arguments per part."""

    out: Path
    gpu: bool
    extra: dict[str, list[str]]

    def budget(self, name: str) -> float:
        return BUDGETS[name][0 if self.gpu else 1]

    def run(self, part: Part, command: list[str], *, timeout: float, cwd: Path | None = None) -> str | None:
        """Run `command` for `part` (its output appended to <part>.log); its output when it exits 0, else None
        with the part marked failed or timed out."""
        part.commands.append(shlex.join(["python", *command[1:]] if command[0] == sys.executable else command))
        # The Triton interpreter is for the kernels alone (that benchmark turns it on itself without a GPU).
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        process = subprocess.Popen(
            command, cwd=cwd or self.out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: a timeout ends torchrun's workers too
        )  # fmt: skip
        try:
            output, timed_out = process.communicate(timeout=max(timeout, 1))[0], False
        except subprocess.TimeoutExpired:
            output, timed_out = _stop(process), True
        with (self.out / f"{part.name}.log").open("a") as log:
            log.write(f"$ {shlex.join(command)}\n{output}\n")
        if not timed_out and process.returncode == 0:
            return output
        part.status = "timed out" if timed_out else "failed"
        ending = f"timed out after {timeout:.0f} s" if timed_out else f"exit status {process.returncode}"
        part.tail = "\n".join([*output.rstrip().splitlines()[-TAIL_LINES:], f"[{ending}]"])
        return None


def _stop(process: subprocess.Popen) -> str:
    """End a process that ran past its budget, and its children: SIGTERM, then SIGKILL; what it printed."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            return process.communicate(timeout=10)[0] or ""
        except subprocess.TimeoutExpired:
            continue
    return process.communicate()[0] or ""


def environment() -> dict[str, str]:
    """The machine and the software the figures depend on; run in a subprocess, so the suite holds no CUDA context."""
    info = {"python": platform.python_version(), "torch": torch.__version__}
    info["cuda"] = torch.version.cuda or "none (CPU build of torch)"
    info["triton"] = _version("triton", "triton")
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        info["nccl"] = ".".join(str(n) for n in torch.cuda.nccl.version())
    else:
        info["gpu"] = f"none (CPU, {os.cpu_count()} cores)"
        info["nccl"] = "n/a"
    info["driver"] = _driver_version()
    for distribution, module in OPTIONAL_PACKAGES.items():
        info[distribution] = _version(distribution, module)
    return info


def _version(distribution: str, module: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        # Installed without metadata (a copied folder, an image's own build): importable but unversioned.
        return "present (no version)" if importlib.util.find_spec(module) is not None else "absent"


def _driver_version() -> str:
    if shutil.which("nvidia-smi") is None:
        return "absent (no nvidia-smi)"
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "unknown (nvidia-smi hung)"
    lines = result.stdout.split()
    return lines[0] if result.returncode == 0 and lines else "unknown (nvidia-smi failed)"


def run_environment(suite: Suite, part: Part) -> dict[str, str]:
    code = "import json; from megaolmo.bench.suite import environment; print(json.dumps(environment()))"
    output = suite.run(part, [sys.executable, "-c", code], timeout=suite.budget(part.name))
    if output is None:
        return {}
    info = json.loads(output.strip().splitlines()[-1])
    write_csv(suite.out / "environment.csv", [{"key": key, "value": value} for key, value in info.items()])
    part.headline = f"{info['gpu']}; torch {info['torch']}, CUDA {info['cuda']}, Triton {info['triton']}"
    return info


def run_gpu_tests(suite: Suite, part: Part) -> None:
    tests = CHECKOUT / "tests"
    if not tests.is_dir():
        part.status, part.headline = "skipped", f"no tests/ beside {CHECKOUT / 'megaolmo'}: not a checkout"
        return
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    output = suite.run(part, command + suite.extra.get(part.name, []), timeout=suite.budget(part.name), cwd=CHECKOUT)
    counts = _pytest_counts(output if output is not None else part.tail)
    if counts:
        write_csv(suite.out / "gpu-tests.csv", [{"outcome": key, "tests": value} for key, value in counts.items()])
        part.headline = ", ".join(f"{value} {key}" for key, value in counts.items())
    if output is not None and not suite.gpu:
        part.headline += " (no GPU: every GPU test skips)"


def _pytest_counts(output: str) -> dict[str, int]:
    """pytest's closing line, e.g. `3 passed, 2 skipped, 400 deselected in 9.1s`, as counts per outcome."""
    for line in reversed(output.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)\b", line)
        if found and re.search(r"\bin [\d.]+s", line):
            return {outcome: int(count) for count, outcome in found}
    return {}


def run_kernels(suite: Suite, part: Part) -> None:
    csv_path = suite.out / "kernels.csv"
    command = [sys.executable, "-m", "megaolmo.bench", "kernels", "--out", str(csv_path)]
    if suite.gpu:
        command += ["--model", "olmo_7b", "--dtype", "bf16"]
    output = suite.run(part, command + suite.extra.get(part.name, []), timeout=suite.budget(part.name))
    if output is None:
        return
    if suite.gpu:
        rows = _read_csv(csv_path)
        part.headline = "; ".join(
            f"{row['op']} fwd+bwd {row['GB/s']} GB/s ({row['%copy']}% of copy)"
            for row in rows
            if row["mode"] == "forward+backward"
        )
        return
    # Without a GPU the benchmark checks the kernels through Triton's interpreter and writes no rows: keep those.
    checks = re.findall(r"^\s+(\w+)\s+max \|triton - torch\| = (\S+)\s+(ok|MISMATCH)$", output, re.MULTILINE)
    rows = [{"op": op, "max abs error vs torch": error, "check": check} for op, error, check in checks]
    write_csv(csv_path, rows)
    part.headline = "no GPU, interpreter check only: " + ", ".join(f"{op} {check}" for op, _error, check in checks)


def run_step(suite: Suite, part: Part) -> None:
    csv_path = suite.out / "step.csv"
    command = [sys.executable, "-m", "megaolmo.bench", "step", "--out", str(csv_path)]
    if suite.gpu:
        command += ["--model", "olmo_1b", "--precision", "bf16"]
    else:
        command += ["--model", "olmo_tiny", "--layers", "1", "--seq-len", "64", "--micro-batch-size", "2",
                    "--steps", "2", "--warmup", "1"]  # fmt: skip
    if suite.run(part, command + suite.extra.get(part.name, []), timeout=suite.budget(part.name)) is None:
        return
    part.headline = "; ".join(
        f"{row['implementation']} {row['note']}" if row.get("note") else
        f"{row['implementation']} {row['tokens/s']} tokens/s, MFU {row['MFU %']}%"
        for row in _read_csv(csv_path)
    )  # fmt: skip


def run_train(suite: Suite, part: Part) -> None:
    run_dir = suite.out / "train_run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale checkpoint there would be resumed from
    steps = 30 if suite.gpu else 6
    if suite.gpu:
        shape = ["experiment=olmo_1b", "model.n_layers=4", "trainer.global_batch_size=16",
                 "trainer.micro_batch_size=4", "optim.warmup_steps=5"]  # fmt: skip
    else:
        shape = ["model=olmo_tiny", "trainer.seq_len=64", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
                 "optim.warmup_steps=2", "cluster.peak_tflops=1.0"]  # fmt: skip
    overrides = [*shape, f"trainer.max_steps={steps}", f"trainer.save_interval={steps // 2}", "trainer.log_interval=1",
                 "trainer.eval_interval=0", "trainer.progress=false", "trainer.tensorboard=false",
                 f"trainer.run_dir={run_dir}", f"hydra.run.dir={run_dir}"]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    command = [*launcher, "-m", "megaolmo.train", *overrides, *suite.extra.get(part.name, [])]
    deadline = time.perf_counter() + suite.budget(part.name)
    if suite.run(part, [*command, f"trainer.stop_at={steps // 2}"], timeout=suite.budget(part.name)) is None:
        return
    if suite.run(part, command, timeout=deadline - time.perf_counter()) is None:  # resumes at steps // 2
        return
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [record for record in records if "loss" in record]
    write_csv(suite.out / "train.csv", train)
    speed = statistics.median(record["tokens_per_second"] for record in train)
    peak = max(record.get("peak_memory_gib", 0.0) for record in records)
    part.headline = (
        f"{train[-1]['step']} steps, resumed at step {steps // 2}: final loss {train[-1]['loss']:.3f}, "
        f"{speed:,.0f} tokens/s (median), peak {peak:.2f} GiB"
    )


RUNNERS: dict[str, Callable[[Suite, Part], object]] = {
    "environment": run_environment,
    "gpu-tests": run_gpu_tests,
    "kernels": run_kernels,
    "step": run_step,
    "train": run_train,
}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _git_revision() -> str | None:
    if not (CHECKOUT / ".git").exists():
        return None
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=CHECKOUT, capture_output=True,
                                text=True, timeout=30, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def summary(parts: list[Part], info: dict[str, str], *, gpu: bool, revision: str | None) -> str:
    """The Markdown block for BENCHMARKS.md: when, which commit, the machine and software, then each part."""
    title = f"### Benchmark suite, {datetime.date.today().isoformat()}"
    lines = [title + (f", commit {revision}" if revision else ""), ""]
    if info:
        lines.append(f"- GPU: {info['gpu']}, driver {info['driver']}, CUDA {info['cuda']}, NCCL {info['nccl']}")
        lines.append(f"- torch {info['torch']}, Triton {info['triton']}, Python {info['python']}")
        lines.append("- " + ", ".join(f"{name} {info[name]}" for name in OPTIONAL_PACKAGES))
    else:
        lines.append("- environment unknown: its part did not finish (below)")
    if not gpu:
        lines.append("- no GPU: every part at tiny shapes on CPU, a check of the suite, not of speed")
    lines += ["", "| part | status | wall s | headline |", "| --- | --- | --- | --- |"]
    lines += [f"| {p.name} | {p.status} | {p.seconds:.1f} | {p.headline.replace('|', '/')} |" for p in parts]
    for part in parts:
        lines += ["", f"#### {part.name}: {part.status}, {part.seconds:.1f} s", ""]
        lines += [f"    {command}" for command in part.commands] or ["    (nothing ran)"]
        if part.headline:
            lines += ["", part.headline]
        if part.tail:
            lines += ["", "Last lines of output:", "", "```", part.tail, "```"]
    return "\n".join(lines) + "\n"


def parse_only(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise MegaolmoError(f"--only {value}: name parts from {','.join(PARTS)}, separated by commas")
    return names


def parse_extra(values: list[str]) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {}
    for value in values:
        name, _, arguments = value.partition("=")
        if name not in PARTS[1:] or not arguments:
            raise MegaolmoError(f"--extra {value}: use PART=ARGS with PART one of {', '.join(PARTS[1:])}")
        extra.setdefault(name, []).extend(shlex.split(arguments))
    return extra


def run(args: argparse.Namespace) -> int:
    selected = parse_only(args.only) if args.only else list(PARTS)
    suite = Suite(out=Path(args.out).resolve(), gpu=torch.cuda.is_available(), extra=parse_extra(args.extra))
    suite.out.mkdir(parents=True, exist_ok=True)
    for name in PARTS:
        (suite.out / f"{name}.log").unlink(missing_ok=True)
    parts, info = [], {}
    for name in PARTS:
        if name not in selected:
            continue
        part = Part(name)
        print(f"suite: {name} ...", flush=True)
        started = time.perf_counter()
        try:
            result = RUNNERS[name](suite, part)
        except (OSError, KeyError, IndexError, ValueError) as err:  # output it could not read; the next part runs
            part.status, part.tail = "failed", f"the suite could not read the output: {type(err).__name__}: {err}"
        part.seconds = time.perf_counter() - started
        if name == "environment" and part.status == "ok":
            info = result
        print(f"suite: {name} {part.status} in {part.seconds:.1f} s  {part.headline}", flush=True)
        parts.append(part)
    text = summary(parts, info, gpu=suite.gpu, revision=_git_revision())
    (suite.out / "summary.md").write_text(text)
    print(f"wrote {suite.out / 'summary.md'}")
    return 0 if all(part.status in ("ok", "skipped") for part in parts) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for summary.md, one CSV per part and each part's log")
    parser.add_argument("--only", help=f"comma-separated parts to run, in the suite's order ({','.join(PARTS)})")
    parser.add_argument("--extra", action="append", default=[], metavar="PART=ARGS",
                        help="more arguments for a part's command, e.g. train=trainer.max_steps=60 (repeatable)")  # fmt: skip
