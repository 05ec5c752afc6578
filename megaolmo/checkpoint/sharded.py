"""Sharded training checkpoints: any layout saves, any layout resumes, nothing is ever half-written.

Each parameter (and its AdamW moments) is saved with `torch.distributed.checkpoint`
as one logical tensor in a canonical layout: fused blocks (q/k/v, up/gate) are
interleaved so that every valid tensor-parallel degree's shard is one contiguous
range, and each rank writes its TP slice as a DTensor. DCP can then reshard to
any TP x PP x DP layout on load, and one CPU process can read the whole model.

    <run_dir>/checkpoints/step000100/   .metadata, __<rank>_0.distcp, trainer_state.json, manifest.json
    <run_dir>/checkpoints/latest        the name of the newest complete checkpoint

A checkpoint is written into `.step000100.tmp` and renamed when every rank has
finished and the manifest (size and sha256 of every file) is written; `latest`
moves only after that. Loading checks the manifest first, so a truncated,
corrupted or missing file is refused, never silently read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from megaolmo.config import ModelConfig
from megaolmo.errors import CheckpointError
from megaolmo.model import build_model
from megaolmo.model.fp8 import load_scaling_states, scaling_states
from megaolmo.parallel import ColumnParallelLinear, tensor_parallel_layers

SHARDED_FORMAT = "megaolmo-sharded"
FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
# Fields that change how the model computes, not the weights it has: free to differ on resume.
RUNTIME_FIELDS = ("attention", "kernels", "linear", "embedding_size")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns whenever no process group exists, even when asked for a single-process read or write."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def checkpoint_name(step: int) -> str:
    return f"step{step:06d}"


def _canonical(layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    return layer.to_canonical(tensor) if isinstance(layer, ColumnParallelLinear) else tensor


def _from_canonical(layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    return layer.from_canonical(tensor) if isinstance(layer, ColumnParallelLinear) else tensor


def _tp_mesh(model):
    mesh = model.mesh.device_mesh
    return None if mesh is None or model.mesh.tp == 1 else mesh["tp"]


def _as_saved(local: torch.Tensor, layer: nn.Module, tp_mesh) -> torch.Tensor:
    """This rank's canonical TP slice as a DTensor over the TP mesh (a plain tensor without TP)."""
    canonical = _canonical(layer, local)
    if tp_mesh is None:
        return canonical
    return DTensor.from_local(canonical, tp_mesh, [Shard(layer.tp_dim)], run_check=False)


def _entries(model, include_replica: bool):
    """(key prefix, parameter, owning TP layer) for every parameter this rank holds."""
    for stage in model.stages:
        owners = tensor_parallel_layers(stage)
        for name, param in stage.named_parameters():
            if param is model.tied_replica and not include_replica:
                continue
            yield name, param, owners[name]


def _unsharded_over_dp(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def training_state_dict(model, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """What this rank contributes to a checkpoint: parameters and AdamW state, canonical and TP-sharded."""
    tp_mesh = _tp_mesh(model)
    state: dict[str, torch.Tensor] = {}
    for name, param, layer in _entries(model, include_replica=False):
        state[f"model/{name}"] = _as_saved(_unsharded_over_dp(param.detach()), layer, tp_mesh)
        moments = optimizer.state.get(param, {})
        for moment in ADAM_MOMENTS:
            if moment in moments:
                state[f"optim/{name}/{moment}"] = _as_saved(_unsharded_over_dp(moments[moment]), layer, tp_mesh)
        if "step" in moments:
            state[f"optim/{name}/step"] = moments["step"].detach().clone().cpu()
    for stage in model.stages:
        state.update({f"fp8/{name}": buffer for name, buffer in scaling_states(stage).items()})
    return state


def _file_digest(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded(
    directory: Path,
    step: int,
    *,
    model,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    keep_last: int,
    keep_every: int | None,
) -> Path:
    """Write the checkpoint of `step` under `directory` (collective); returns its path once committed."""
    final = directory / checkpoint_name(step)
    tmp = directory / f".{final.name}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    failed, error, digests = torch.zeros(1), None, {}
    try:
        with _single_process_is_intended():
            dcp.save(training_state_dict(model, optimizer), checkpoint_id=str(tmp), no_dist=not _distributed())
        mine = sorted(p.name for p in tmp.iterdir() if p.name.startswith(f"__{_rank()}_"))
        digests = {name: _file_digest(tmp / name) for name in mine}
    except (OSError, RuntimeError, CheckpointException) as err:  # a full disk, a quota, a vanished mount;
        failed[0], error = 1.0, err  # torch's writers report some of those as RuntimeError
    if _distributed():
        dist.all_reduce(failed)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, digests)
    else:
        gathered = [digests]
    if failed.item():
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1]}" if error else "on another rank"
        raise CheckpointError(f"saving checkpoint {final.name} failed ({reason}); the previous one is untouched")
    if _rank() == 0:
        _commit(tmp, final, gathered=gathered, trainer_state=trainer_state, config=model.config)
        _update_latest(directory, final.name)
        _apply_retention(directory, keep_last, keep_every)
    _barrier()
    return final


def _commit(tmp: Path, final: Path, *, gathered: list[dict], trainer_state: dict, config: ModelConfig) -> None:
    files = {name: digest for part in gathered for name, digest in part.items()}
    files[".metadata"] = _file_digest(tmp / ".metadata")
    state = {"format": SHARDED_FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict(), **trainer_state}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    files[STATE_FILE] = _file_digest(tmp / STATE_FILE)
    (tmp / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=2) + "\n")
    for path in tmp.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # a checkpoint of the same step from an earlier, abandoned leg of this run
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def _update_latest(directory: Path, name: str) -> None:
    tmp = directory / f".{LATEST_FILE}.tmp"
    tmp.write_text(name + "\n")
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, directory / LATEST_FILE)


def _apply_retention(directory: Path, keep_last: int, keep_every: int | None) -> None:
    """Keep the newest `keep_last` checkpoints, and every `keep_every`-th step for good."""
    steps = sorted(int(p.name.removeprefix("step")) for p in directory.glob("step[0-9]*") if p.is_dir())
    keep = set(steps[-keep_last:]) if keep_last > 0 else set(steps[-1:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    for step in steps:
        if step not in keep:
            shutil.rmtree(directory / checkpoint_name(step), ignore_errors=True)


def verify(path: Path) -> dict:
    """The trainer state of a complete, undamaged checkpoint; CheckpointError in one line otherwise."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise CheckpointError(f"{path} is incomplete (no {MANIFEST_FILE}); resume from an earlier checkpoint")
    files = json.loads(manifest_file.read_text())["files"]
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing; the checkpoint cannot be loaded")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: {name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
            )
        if _file_digest(file)["sha256"] != expected["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its sha256 in the manifest (corrupted)")
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("format") != SHARDED_FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a megaolmo sharded checkpoint of format version {FORMAT_VERSION}")
    return state


def remove_incomplete(directory: Path) -> None:
    """Delete what saves interrupted by a crash left behind (they never became checkpoints). Rank 0 only."""
    for leftover in [*directory.glob(".step*.tmp"), *directory.glob(f".{LATEST_FILE}.tmp")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def find_resume_point(directory: Path) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one; None when there is none."""
    latest = directory / LATEST_FILE
    if latest.is_file():
        candidate = directory / latest.read_text().strip()
        if (candidate / MANIFEST_FILE).is_file():
            return candidate
    complete = sorted(p for p in directory.glob("step[0-9]*") if (p / MANIFEST_FILE).is_file())
    return complete[-1] if complete else None


def check_same_model(saved: dict, config: ModelConfig, path: Path) -> None:
    current = config.to_dict()
    differing = sorted(
        key for key in current if key not in RUNTIME_FIELDS and saved.get(key, current[key]) != current[key]
    )
    if differing:
        details = ", ".join(f"{key}={saved.get(key)!r} (now {current[key]!r})" for key in differing)
        raise CheckpointError(f"{path} was saved from a different model: {details}; resume with that model config")
    if saved.get("embedding_size") not in (None, config.padded_vocab_size):
        raise CheckpointError(
            f"{path} has an embedding of {saved['embedding_size']} rows but this layout pads to "
            f"{config.padded_vocab_size}; set model.embedding_size={saved['embedding_size']}"
        )


def _restore(target: torch.Tensor, canonical: torch.Tensor, layer: nn.Module) -> None:
    """Copy a loaded canonical TP slice into a parameter or moment (an FSDP DTensor, or a plain tensor)."""
    local = _from_canonical(layer, canonical.to_local() if isinstance(canonical, DTensor) else canonical)
    if isinstance(target, DTensor):
        shard = distribute_tensor(local, target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(shard.to_local())
    else:
        target.copy_(local)


def _verified_once(path: Path) -> dict:
    """`verify` on rank 0 only (it reads and hashes every file), its verdict shared with every rank."""
    if not _distributed():
        return verify(path)
    verdict: list = [None]
    if _rank() == 0:
        try:
            verdict[0] = verify(path)
        except CheckpointError as err:
            verdict[0] = str(err)
    dist.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], str):
        raise CheckpointError(verdict[0])
    return verdict[0]


@torch.no_grad()
def restore_sharded(path: Path, model, optimizer: torch.optim.Optimizer) -> dict:
    """Load a checkpoint (saved at any layout) into this layout's model and optimizer; returns its state."""
    state = _verified_once(path)
    check_same_model(state["model"], model.config, path)
    tp_mesh = _tp_mesh(model)
    template: dict[str, torch.Tensor] = {}
    targets = []
    for name, param, layer in _entries(model, include_replica=True):
        device = param.to_local().device if isinstance(param, DTensor) else param.device
        # Room for this rank's TP slice, whole over DP (a DTensor's shape is that shape).
        slots = [torch.empty(param.shape, dtype=param.dtype, device=device) for _ in range(1 + len(ADAM_MOMENTS))]
        template[f"model/{name}"] = _as_saved(slots[0], layer, tp_mesh)
        targets.append((f"model/{name}", param, layer))
        moments = optimizer.state.setdefault(param, {})
        for moment, slot in zip(ADAM_MOMENTS, slots[1:]):
            moments.setdefault(moment, torch.zeros_like(param))
            template[f"optim/{name}/{moment}"] = _as_saved(slot, layer, tp_mesh)
            targets.append((f"optim/{name}/{moment}", moments[moment], layer))
        template[f"optim/{name}/step"] = torch.zeros((), dtype=torch.float32)
    saved_keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    scaling = {}  # Transformer Engine's FP8 scaling state, when both the checkpoint and this model have it
    for stage in model.stages:
        scaling.update({k: v for k, v in scaling_states(stage).items() if f"fp8/{k}" in saved_keys})
    template.update({f"fp8/{name}": buffer for name, buffer in scaling.items()})
    with _single_process_is_intended():
        dcp.load(template, checkpoint_id=str(path), no_dist=not _distributed())
    for stage in model.stages:
        load_scaling_states(stage, {name: template[f"fp8/{name}"] for name in scaling})
    for key, target, layer in targets:
        _restore(target, template[key], layer)
    for name, param, _ in _entries(model, include_replica=True):
        device = param.device if optimizer.defaults.get("fused") or optimizer.defaults.get("capturable") else "cpu"
        optimizer.state[param]["step"] = template[f"optim/{name}/step"].clone().to(device)
    return state


def load_sharded(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The whole model of a sharded checkpoint on one CPU process, whatever layout wrote it."""
    state = verify(path)
    config = ModelConfig.from_dict(state["model"])
    model = build_model(config, device="cpu", init=False)
    owners = tensor_parallel_layers(model)
    template = {f"model/{name}": _canonical(owners[name], p.detach().clone()) for name, p in model.named_parameters()}
    with _single_process_is_intended():
        dcp.load(template, checkpoint_id=str(path), no_dist=True)
    return config, {
        name: _from_canonical(owners[name], template[f"model/{name}"]) for name, _ in model.named_parameters()
    }
