"""The Slurm recipes and Hydra sweeps against a real one-node Slurm.

Where no Slurm answers, the tests start the local one (`slurm/local/start.sh`:
needs root and Debian's slurm-wlm and munge); where that cannot start, they fail
with its reason.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_fixtures import docs, small_tokenizer, write_dolma
from helpers import assert_ok
from training_run import TINY, data_args

import megaolmo
from megaolmo.checkpoint.directory import MANIFEST_FILE
from megaolmo.data import load_tokenizer, prepare
from megaolmo.eval import evaluate_tasks, load_tasks

REPO = Path(__file__).resolve().parent.parent
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
STEPS = 8
# The tiny model on 8 CPU ranks, TP2 (with SP) x PP2 x DP2, in place of the recipe's 65B on 512 GPUs.
RECIPE_OVERRIDES = [
    "model=olmo_tiny", "optim=tiny", "trainer=tiny", "cluster=local_cpu", "parallel=tp2_pp2_dp2", "parallel.vp=1",
    "parallel.pp_schedule=1f1b", "parallel.activation_checkpointing=none", "model.n_layers=4", *TINY,
    f"trainer.max_steps={STEPS}", "trainer.seq_len=64", "trainer.eval_interval=0", "trainer.save_interval=null",
]  # fmt: skip
SBATCH_FOR_CPU = ["--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]


def node_states() -> list[str]:
    return subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, check=False).stdout.split()


def slurm_running() -> bool:
    return shutil.which("sbatch") is not None and any(s in {"idle", "mix", "alloc"} for s in node_states())


@pytest.fixture(scope="module", autouse=True)
def slurm() -> None:
    """A Slurm to submit to: the one that answers, or the local one started now."""
    if slurm_running():
        return
    started = subprocess.run(["bash", "slurm/local/start.sh"], cwd=REPO, capture_output=True, text=True, check=False)
    if started.returncode != 0 or not slurm_running():
        pytest.fail(f"no Slurm answers and the local one did not start: {started.stderr.strip()}", pytrace=False)


def job_environment(runs: Path) -> dict[str, str]:
    """This interpreter's environment first on PATH (sbatch passes the environment on), runs kept in `runs`."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "MEGAOLMO_RUNS": str(runs)}


def submit(name: str, runs: Path, overrides: list[str]) -> str:
    command = ["sbatch", "--parsable", f"--job-name={name}", f"--output={runs}/{name}.out", *SBATCH_FOR_CPU]
    result = subprocess.run(
        [*command, "slurm/olmo65b.sh", *overrides],
        cwd=REPO, env=job_environment(runs), capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def wait_for(job_id: str, timeout: float = 900.0) -> dict[str, str]:
    """Poll until the job ends. Slurm holds a requeued job back for two minutes (BeginTime) while the node
    cleans up after the last leg; release it as soon as the node is idle again (earlier, Slurm refuses to
    launch it: "Job credential revoked")."""
    deadline = time.monotonic() + timeout
    held_since = None
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields["JobState"] in FINISHED:
            return fields
        if fields["JobState"] == "PENDING" and fields.get("Reason") == "BeginTime":
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since > 5.0 and node_states() == ["idle"]:
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        time.sleep(1.0)
    subprocess.run(["scancel", job_id], check=False)
    raise TimeoutError(f"job {job_id} still {fields['JobState']} after {timeout:.0f} s")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in metrics(run_dir) if "loss" in record}


@pytest.fixture(scope="module")
def straight_run(dataset: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """`sbatch slurm/olmo65b.sh` with the tiny overrides, uninterrupted."""
    runs = tmp_path_factory.mktemp("slurm-runs")
    job_id = submit("straight", runs, [*RECIPE_OVERRIDES, *data_args(dataset)])
    return runs, wait_for(job_id)


def test_recipe_trains_tp2_pp2_dp2_on_slurm(straight_run: tuple[Path, dict[str, str]]) -> None:
    runs, fields = straight_run
    log = (runs / "straight.out").read_text()
    assert fields["JobState"] == "COMPLETED", log
    assert fields["ExitCode"] == "0:0"
    assert "8 ranks on 1 node(s)" in log
    run_dir = runs / "straight"
    assert sorted(step_losses(run_dir)) == list(range(1, STEPS + 1))
    assert (run_dir / "final" / MANIFEST_FILE).is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_preempted_job_requeues_and_ends_with_the_same_losses(
    straight_run: tuple[Path, dict[str, str]], dataset: dict
) -> None:
    runs = straight_run[0]
    job_id = submit("preempted", runs, [*RECIPE_OVERRIDES, *data_args(dataset)])
    run_dir = runs / "preempted"
    deadline = time.monotonic() + 600
    while len(step_losses(run_dir)) < 2:  # signal once training is under way, as Slurm's warning would
        assert time.monotonic() < deadline, "the job never logged its second step"
        assert job_fields(job_id)["JobState"] not in FINISHED, (runs / "preempted.out").read_text()
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    fields = wait_for(job_id)
    log = (runs / "preempted.out").read_text()
    assert fields["JobState"] == "COMPLETED", log
    assert fields["Restarts"] == "1", log
    assert "stopped with a checkpoint; requeueing" in log
    assert "leg 2" in log and "resumed from" in log
    straight = step_losses(runs / "straight")
    resumed = step_losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step, loss in straight.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6), step


def test_eval_script_scores_the_recipes_checkpoint_sharded_tp2_pp2(
    straight_run: tuple[Path, dict[str, str]], dataset: dict
) -> None:
    """`sbatch slurm/eval.sh` on 4 CPU ranks, the model sharded as it trained, equals one process's scores."""
    runs = straight_run[0]
    final, out = runs / "straight" / "final", runs / "eval.json"
    command = ["sbatch", "--parsable", "--job-name=eval", f"--output={runs}/eval.out", *SBATCH_FOR_CPU]
    command += ["--ntasks-per-node=4", "slurm/eval.sh", "downstream", str(final), str(dataset["task"])]
    command += ["--tokenizer", str(dataset["tokenizer"]), "--tp", "2", "--pp", "2", "--per-example", "--out", str(out)]
    submitted = subprocess.run(command, cwd=REPO, env=job_environment(runs), capture_output=True, text=True, check=True)
    fields = wait_for(submitted.stdout.strip().split(";")[0])
    assert fields["JobState"] == "COMPLETED", (runs / "eval.out").read_text()
    results = json.loads(out.read_text())
    assert results["layout"] == {"tp": 2, "pp": 2, "cp": 1, "dp": 1}
    single = evaluate_tasks(megaolmo.load(final), load_tokenizer(dataset["tokenizer"]), load_tasks([dataset["task"]]),
                            per_example=True)  # fmt: skip
    for got, want in zip(
        results["tasks"]["synthetic"]["per_example"], single["tasks"]["synthetic"]["per_example"], strict=True
    ):
        assert got["logprobs"] == pytest.approx(want["logprobs"], rel=1e-5)


def test_prepare_array_of_two_tasks_writes_one_jobs_output(tmp_path: Path) -> None:
    """`sbatch --array=0-1 slurm/prepare_dolma.sh`: each task tokenizes its half of the shards into one directory,
    and the union (metadata.json included, written by whichever task commits last) is one process's output."""
    tokenizer = small_tokenizer(tmp_path / "tokenizer.json")
    for shard in range(4):
        texts = [f"shard {shard} document {i}: the quick brown fox jumps over the lazy dog." for i in range(20)]
        write_dolma(tmp_path / "in" / f"part-{shard}.json.gz", docs(texts, source=f"src{shard % 2}"))
    prepare([tmp_path / "in"], tmp_path / "one", tokenizer_path=tokenizer, progress=False)
    command = ["sbatch", "--parsable", "--array=0-1", f"--output={tmp_path}/prepare-%a.out", "--cpus-per-task=1"]
    command += ["--time=10", "slurm/prepare_dolma.sh", str(tmp_path / "in"), "--out", str(tmp_path / "array")]
    command += ["--tokenizer", str(tokenizer)]
    submitted = subprocess.run(command, cwd=REPO, env=job_environment(tmp_path), capture_output=True, text=True,
                               check=True)  # fmt: skip
    array_id = submitted.stdout.strip().split(";")[0]
    for task in (0, 1):
        fields = wait_for(f"{array_id}_{task}")
        assert fields["JobState"] == "COMPLETED", "\n".join(p.read_text() for p in tmp_path.glob("prepare-*.out"))
    for name in ["metadata.json", *(f"part-{shard}.npy" for shard in range(4))]:
        assert (tmp_path / "array" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_sweep_runs_one_slurm_job_per_point_and_summarizes(dataset: dict, tmp_path: Path) -> None:
    """A Hydra sweep through submitit, 2 ranks (DP2) per point, matches the same sweep run here one point
    after another on one process."""
    sweep = [*TINY, *data_args(dataset), "optim.lr=1e-3,3e-3", "trainer.eval_interval=0"]
    local = subprocess.run(
        [sys.executable, "-m", "megaolmo.train", "-m", *sweep, f"hydra.sweep.dir={tmp_path / 'local'}"],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert_ok(local)
    on_slurm = subprocess.run(
        [
            sys.executable, "-m", "megaolmo.train", "-m", *sweep, f"hydra.sweep.dir={tmp_path / 'slurm'}",
            "hydra/launcher=submitit_slurm", "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=15", "parallel.dp=2",
        ],
        cwd=tmp_path, env=job_environment(tmp_path), capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    assert_ok(on_slurm)
    assert "sweep summary: 2 point(s)" in on_slurm.stdout
    for name in ("local", "slurm"):
        points = sorted(path.name for path in (tmp_path / name).iterdir() if (path / "metrics.jsonl").is_file())
        assert points == ["optim.lr=0.001", "optim.lr=0.003"]  # named after what the sweep varies
    with (tmp_path / "slurm" / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["optim.lr"] for row in rows} == {"0.001", "0.003"}
    losses = [float(row["loss"]) for row in rows]
    assert losses == sorted(losses)
    assert {row["status"] for row in rows} == {"finished"}
    for point in (tmp_path / "slurm").iterdir():
        if (point / "metrics.jsonl").is_file():
            here = step_losses(tmp_path / "local" / point.name)
            assert step_losses(point) == pytest.approx(here, rel=1e-5)
