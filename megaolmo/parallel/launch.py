"""Joining the job: torchrun's or Slurm's environment, or none at all (one process)."""

from __future__ import annotations

import datetime
import os
import subprocess

import torch
import torch.distributed as dist


def launch_world_size() -> int:
    """Ranks in this job as the launcher tells it (torchrun's WORLD_SIZE, Slurm's SLURM_NTASKS), else 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return 1


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        hosts = [nodelist.split(",")[0]]
    return hosts[0]


def export_slurm_environment() -> None:
    """Translate an `srun` task's SLURM_* variables into the env:// variables torch.distributed reads."""
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def init_distributed(device_type: str) -> bool:
    """Initialize the default process group when launched with more than one rank, or by torchrun (even for
    one rank: `torchrun --nproc-per-node 1` runs the distributed code path, NCCL and FSDP, on one GPU);
    NCCL on CUDA, gloo on CPU."""
    if launch_world_size() == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    if "WORLD_SIZE" not in os.environ:
        export_slurm_environment()
    timeout = datetime.timedelta(minutes=30)
    if device_type != "cuda":
        dist.init_process_group("gloo", timeout=timeout)
        return True
    # Bound to this rank's GPU from the start, so that every collective, barriers and object
    # collectives included, runs on it (torchrun numbers one GPU per local rank).
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=timeout, device_id=device)
    return True


def is_rank_zero() -> bool:
    """The rank that prints and writes shared files; known from the launcher before the group exists."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def shutdown(clean: bool) -> None:
    """Leave the job. After a clean run every rank first waits for the others: gloo aborts a process
    whose peers tear down their connections while it still finishes its last messages."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
