"""Running `python -m megaolmo.train` from tests: a small Dolma corpus, the tiny model's overrides, launchers."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from megaolmo.data import prepare

VOCAB = 512
TINY = [
    "model.d_model=64", "model.n_heads=4", "model.ffn_hidden_size=128", "model.max_sequence_length=64",
    f"model.vocab_size={VOCAB}", "trainer.max_steps=5", "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2", "trainer.log_interval=1", "trainer.eval_interval=5", "trainer.eval_batches=1",
    "trainer.progress=false", "trainer.tensorboard=false", "cluster.peak_tflops=1.0",
]  # fmt: skip


def write_dolma(path: Path, source: str, n_docs: int, seed: int) -> None:
    rng, words = random.Random(seed), _words()
    with gzip.open(path, "wt") as handle:
        for i in range(n_docs):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))
            handle.write(json.dumps({"id": f"{source}-{i}", "text": text, "source": source}) + "\n")


def prepare_dataset(root: Path) -> dict[str, Path]:
    """Train and held-out memmaps (and the BPE they were made with) of a synthetic two-source corpus."""
    write_dolma(root / "web.jsonl.gz", "web", 300, 0)
    write_dolma(root / "code.jsonl.gz", "code", 100, 1)
    write_dolma(root / "valid_web.jsonl.gz", "web", 30, 2)
    prepare(
        [root / "web.jsonl.gz", root / "code.jsonl.gz"], root / "train", train_tokenizer_vocab=VOCAB, progress=False
    )
    prepare(
        [root / "valid_web.jsonl.gz"], root / "valid", tokenizer_path=root / "train" / "tokenizer.json", progress=False
    )
    write_task(root / "tasks" / "synthetic.jsonl", 12)
    return {
        "train": root / "train",
        "valid": root / "valid",
        "tokenizer": root / "train" / "tokenizer.json",
        "task": root / "tasks" / "synthetic.jsonl",
    }


def write_task(path: Path, n_examples: int) -> None:
    """A multiple-choice task in megaolmo.eval's simple format, over the corpus's words."""
    rng, words = random.Random(5), _words()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for _ in range(n_examples):
            context = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
            choices = [" " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(4)]
            handle.write(json.dumps({"context": context, "choices": choices, "label": rng.randrange(4)}) + "\n")


def _words() -> list[str]:
    vocabulary = random.Random(0)  # the same words in every file, so the tokenizer fits them all
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(vocabulary.choice(letters) for _ in range(vocabulary.randint(2, 9))) for _ in range(400)]


def data_args(data: dict[str, Path]) -> list[str]:
    return [
        "data=dolma",
        f"data.paths=[{data['train']}]",
        f"data.valid_paths=[{data['valid'] / 'valid_web.npy'}]",
        f"data.tokenizer={data['tokenizer']}",
    ]


def train_command(args: list[str], run_dir: Path, ranks: int = 1) -> list[str]:
    """`python -m megaolmo.train` (under torchrun for several ranks) writing into `run_dir`."""
    launcher = [sys.executable, "-m", "megaolmo.train"]
    if ranks > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(ranks),
            "-m",
            "megaolmo.train",
        ]
    return [*launcher, f"trainer.run_dir={run_dir}", f"hydra.run.dir={run_dir}", *args]


def train(args: list[str], run_dir: Path, ranks: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env or {})
    return subprocess.run(
        train_command(args, run_dir, ranks),
        capture_output=True, text=True, timeout=600, check=False, env=environment, cwd=run_dir.parent,
    )  # fmt: skip


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def stop_after(process: subprocess.Popen, run_dir: Path, steps: int, timeout: float = 240) -> str:
    """Send SIGTERM to a training `process` once it has logged `steps` steps; its stderr when it exits."""
    deadline = time.time() + timeout
    while not (run_dir / "metrics.jsonl").is_file() or len(losses(run_dir)) < steps:
        assert time.time() < deadline and process.poll() is None, f"the run never logged step {steps}"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=timeout)[1]
