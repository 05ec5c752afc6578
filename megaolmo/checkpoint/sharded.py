"""Sharded training checkpoints: any layout saves, any layout resumes, nothing is ever half-written.

Each parameter and AdamW moment is saved with `torch.distributed.checkpoint` as
the unsharded model's tensor (the one a single process has). Each rank writes
its own share, straight from its storage, and reads back only the saved chunks
that overlap its share, straight into it (shares.py, dcp_io.py): a save or a
resume never gathers a tensor, and DCP reshards to any TP x PP x DP layout.

    <run_dir>/checkpoints/step000100/   .metadata, __<rank>_0.distcp, trainer_state.json, manifest.json
    <run_dir>/checkpoints/latest        the name of the newest complete checkpoint
    <run_dir>/final/                    the finished run's weights, the same format without optimizer state

A checkpoint is written into `.step000100.tmp` and renamed once every rank has
finished and the manifest (the size and sha256 of every file and of every item
in it, hashed as it was written) is in; `latest` moves only after that. On
resume each rank checks every item it reads against its digest as it reads it,
and the verdicts are combined, so a truncated, corrupted or missing file is
refused, never silently used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megaolmo.atomic import fsync_dir, write_durably
from megaolmo.checkpoint.consolidated import check_specs
from megaolmo.checkpoint.dcp_io import Entry, HashingWriter, ShareSavePlanner, VerifyingReader, read_entries
from megaolmo.checkpoint.directory import MANIFEST_FILE, apply_retention, checkpoint_name, update_latest
from megaolmo.checkpoint.shares import Share, share_of, whole
from megaolmo.config import ModelConfig
from megaolmo.errors import CheckpointError
from megaolmo.model.fp8 import load_scaling_states, scaling_states
from megaolmo.parallel import tensor_parallel_layers

SHARDED_FORMAT = "megaolmo-sharded"
FORMAT_VERSION = 2  # 2: tensors as the unsharded model has them (1 interleaved fused blocks)
STATE_FILE = "trainer_state.json"
WEIGHTS_ONLY = "weights"  # trainer_state["contents"] of final weights, which hold no optimizer state
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
# Fields that change how the model computes, not the weights it has: free to differ on resume.
RUNTIME_FIELDS = ("attention", "kernels", "linear", "compile", "embedding_size")


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


def _entries(model, include_replica: bool):
    """(name, parameter, owning TP layer or None) for every parameter this rank holds."""
    for stage in model.stages:
        owners = tensor_parallel_layers(stage)
        for name, param in stage.named_parameters():
            if param is model.tied_replica and not include_replica:
                continue
            yield name, param, owners.get(name)


def model_entries(model, *, include_replica: bool = False) -> dict[str, Entry]:
    """This rank's shares of the model's parameters (the fp32 master weights under FSDP)."""
    return {
        f"model/{name}": share_of(param.detach(), layer)
        for name, param, layer in _entries(model, include_replica=include_replica)
    }


def training_entries(model, optimizer: torch.optim.Optimizer) -> dict[str, Entry]:
    """What this rank contributes to a training checkpoint: its shares of the parameters and AdamW state."""
    entries = model_entries(model)
    for name, param, layer in _entries(model, include_replica=False):
        moments = optimizer.state.get(param, {})
        for moment in ADAM_MOMENTS:
            if moment in moments:
                entries[f"optim/{name}/{moment}"] = share_of(moments[moment], layer)
        if "step" in moments:
            entries[f"optim/{name}/step"] = whole(moments["step"].detach().cpu())
    for stage in model.stages:
        entries.update({f"fp8/{name}": buffer for name, buffer in scaling_states(stage).items()})
    return entries


def _digest(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _file_digest(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def agree_on_failure(error: BaseException | None, device: torch.device) -> str | None:
    """The first failure any rank had (its one-line reason), or None: one flag all-reduced on `device`."""
    if not _distributed():
        return _reason(error) if error else None
    failed = torch.tensor([float(error is not None)], device=device)
    dist.all_reduce(failed)
    if not failed.item():
        return None
    reasons: list = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, _reason(error) if error else None)  # short strings only
    rank, reason = next((r, text) for r, text in enumerate(reasons) if text)
    return reason if rank == _rank() else f"on rank {rank}: {reason}"


def _reason(error: BaseException) -> str:
    if isinstance(error, CheckpointError):
        return str(error)
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def write_checkpoint(final: Path, entries: dict[str, Entry], *, trainer_state: dict, config: ModelConfig,
                     device: torch.device, on_commit: Callable[[], None] = lambda: None) -> None:  # fmt: skip
    """Write `entries` (every rank its own) as the checkpoint `final`, committed atomically, then call
    `on_commit` on rank 0. Collective.

    Each phase ends with every rank agreeing whether any rank failed, so a failure on one rank (a full
    disk, a run directory that is not shared) stops every rank at the same point with the same error.
    """
    tmp = final.parent / f".{final.name}.tmp"
    writer = HashingWriter(tmp)

    def make_tmp() -> None:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def see_tmp() -> None:
        if not tmp.is_dir():
            raise CheckpointError(
                f"{tmp} is not visible on rank {_rank()}; put trainer.run_dir on a shared file system"
            )

    def save() -> None:
        with _single_process_is_intended():
            dcp.save(entries, storage_writer=writer, planner=ShareSavePlanner(), no_dist=not _distributed())

    def commit() -> None:
        gathered = [None] * dist.get_world_size() if _distributed() and _rank() == 0 else [writer.digests]
        if _distributed():
            dist.gather_object(writer.digests, gathered if _rank() == 0 else None, dst=0)  # sizes and sha256s
        if _rank() == 0:
            _commit(tmp, final, gathered=gathered, trainer_state=trainer_state, config=config)
            on_commit()

    for phase in (make_tmp, see_tmp, save, commit):
        error = None
        try:
            phase()
        except (OSError, RuntimeError, CheckpointException, CheckpointError) as err:
            error = err  # torch's writers report some I/O failures as RuntimeError
        reason = agree_on_failure(error, device)
        if reason is not None:
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            _barrier()
            raise CheckpointError(f"saving checkpoint {final.name} failed ({reason}); the previous one is untouched")


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
    model.reshard()  # the fp32 shards the optimizer holds, whatever a forward-only pass left gathered

    def point_latest_and_prune() -> None:
        update_latest(directory, final.name)
        apply_retention(directory, keep_last, keep_every)

    write_checkpoint(final, training_entries(model, optimizer), trainer_state=trainer_state, config=model.config,
                     device=model.mesh.device, on_commit=point_latest_and_prune)  # fmt: skip
    return final


def save_final_weights(path: Path, model, *, step: int) -> Path:
    """The finished run's weights (fp32 masters, no optimizer state) as a sharded checkpoint. Collective.

    Every rank writes its own share, as for a training checkpoint: nothing is gathered on one rank.
    """
    model.reshard()  # the fp32 shards the optimizer holds, whatever a forward-only pass left gathered
    write_checkpoint(path, model_entries(model), trainer_state={"step": step, "contents": WEIGHTS_ONLY},
                     config=model.config, device=model.mesh.device)  # fmt: skip
    return path


def _commit(tmp: Path, final: Path, *, gathered: list[dict], trainer_state: dict, config: ModelConfig) -> None:
    files = {name: digest for part in gathered for name, digest in part.items()}
    state = {"format": SHARDED_FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict(), **trainer_state}
    state_bytes = (json.dumps(state, indent=2) + "\n").encode()
    write_durably(tmp / STATE_FILE, state_bytes)
    files[STATE_FILE] = _digest(state_bytes)
    write_durably(tmp / MANIFEST_FILE, (json.dumps({"files": files}, indent=2) + "\n").encode())
    fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier, abandoned leg of this run
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


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


def _read_state(path: Path) -> tuple[dict, dict]:
    """The manifest's files and the trainer state of a complete checkpoint (small JSON files, on every rank)."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise CheckpointError(f"{path} is incomplete (no {MANIFEST_FILE}); resume from an earlier checkpoint")
    files = json.loads(manifest_file.read_text())["files"]
    _check_file(path, STATE_FILE, files)
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("format") != SHARDED_FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a megaolmo sharded checkpoint of format version {FORMAT_VERSION} "
            f"(format {state.get('format')!r}, version {state.get('format_version')!r})"
        )
    return files, state


def _check_file(path: Path, name: str, files: dict) -> int:
    """Size and sha256 of one file against the manifest; returns the bytes hashed."""
    if name not in files:
        raise CheckpointError(f"{path}: {name} is not in the manifest; the checkpoint cannot be loaded")
    file, expected = path / name, files[name]
    if not file.is_file():
        raise CheckpointError(f"{path}: {name} is missing; the checkpoint cannot be loaded")
    if file.stat().st_size != expected["bytes"]:
        raise CheckpointError(
            f"{path}: {name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
        )
    if _file_digest(file)["sha256"] != expected["sha256"]:
        raise CheckpointError(f"{path}: {name} does not match its sha256 in the manifest (corrupted)")
    return expected["bytes"]


def _check_sizes(path: Path, files: dict) -> None:
    """Every file of the manifest is there with its size (a cheap stat); the bytes are checked as they are read."""
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing; the checkpoint cannot be loaded")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: {name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
            )


def _check_entries(path: Path, entries: dict[str, Entry], metadata) -> None:
    """Every entry this rank loads is in the checkpoint, with the shape this model gives it."""
    stored = metadata.state_dict_metadata
    for key, entry in entries.items():
        if key not in stored:
            what = "optimizer state" if key.startswith("optim/") else "tensor"
            raise CheckpointError(f"{path} has no {what} {key}; it was saved from another model or without it")
        saved = stored[key]
        if isinstance(entry, Share) and isinstance(saved, TensorStorageMetadata) and tuple(saved.size) != entry.shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(saved.size)} but this model's is {entry.shape}")


def _open(path: Path) -> tuple[dict, VerifyingReader, object]:
    """The trainer state, a reader checking every item against the manifest, and DCP's metadata, once the
    small files match their digests and every file its size."""
    files, state = _read_state(path)
    _check_sizes(path, files)
    _check_file(path, ".metadata", files)
    reader = VerifyingReader(path, files)
    return state, reader, reader.read_metadata()


def load_entries(path: Path, entries: dict[str, Entry], *, device: torch.device,
                  accept: Callable[[dict], None]) -> dict:  # fmt: skip
    """Fill this rank's `entries` from the checkpoint at `path`, once `accept(trainer state)` has passed;
    returns the trainer state.

    Every rank reads only the saved chunks that overlap its share, checking each against its sha256 as
    it reads it (its own files' items when the layout is the one that saved); one flag per phase tells
    every rank whether any failed.
    """
    opened: list = []

    def check() -> None:
        opened.extend(_open(path))
        accept(opened[0])
        _check_entries(path, entries, opened[2])

    def load() -> None:
        read_entries(opened[1], opened[2], entries)

    for phase in (check, load):
        error = None
        try:
            phase()
        except (OSError, RuntimeError, ValueError, KeyError, CheckpointError) as err:
            error = err  # (ValueError, KeyError: a damaged metadata file that still matched its digest)
        reason = agree_on_failure(error, device)
        if reason is not None:
            raise CheckpointError(reason if isinstance(error, CheckpointError) else f"loading {path} failed ({reason})")
    return opened[0]


@torch.no_grad()
def restore_sharded(path: Path, model, optimizer: torch.optim.Optimizer) -> dict:
    """Load a checkpoint (saved at any layout) into this layout's model and optimizer; returns its state."""

    def accept(state: dict) -> None:
        if state.get("contents") == WEIGHTS_ONLY:
            raise CheckpointError(
                f"{path} holds final weights only (no optimizer state); resume from a checkpoint under checkpoints/"
            )
        check_same_model(state["model"], model.config, path)

    model.reshard()  # the fp32 shards the optimizer holds, whatever a forward-only pass left gathered
    entries = model_entries(model, include_replica=True)
    steps: dict[str, torch.Tensor] = {}
    for name, param, layer in _entries(model, include_replica=True):
        moments = optimizer.state.setdefault(param, {})
        for moment in ADAM_MOMENTS:
            moments.setdefault(moment, torch.zeros_like(param))
            entries[f"optim/{name}/{moment}"] = share_of(moments[moment], layer)
        steps[name] = torch.zeros((), dtype=torch.float32, device="cpu")
        entries[f"optim/{name}/step"] = whole(steps[name])
    scaling: dict[str, io.BytesIO] = {}  # Transformer Engine's FP8 scaling state, when this model has it
    for stage in model.stages:
        scaling.update(scaling_states(stage))
    entries.update({f"fp8/{name}": buffer for name, buffer in scaling.items()})
    state = load_entries(path, entries, device=model.mesh.device, accept=accept)
    for stage in model.stages:
        load_scaling_states(stage, scaling)
    for name, param, _ in _entries(model, include_replica=True):
        device = param.device if optimizer.defaults.get("fused") or optimizer.defaults.get("capturable") else "cpu"
        optimizer.state[param]["step"] = steps[name].to(device)
    return state


class ShardedTensors:
    """The model tensors of a sharded checkpoint (any layout wrote it), read one at a time in one process.

    Conversions and evaluation stream through it: reading a tensor holds that tensor and, one at a time,
    the saved chunks it is read from (their bytes and their tensor).
    """

    def __init__(self, path: Path) -> None:
        self.state, self._reader, self._metadata = _open(path)
        self.config = ModelConfig.from_dict(self.state["model"])
        self.specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            key.removeprefix("model/"): (tuple(md.size), md.properties.dtype)
            for key, md in self._metadata.state_dict_metadata.items()
            if key.startswith("model/")
        }
        check_specs(self.config, self.specs, str(path))

    def read(self, name: str) -> torch.Tensor:
        shape, dtype = self.specs[name]
        tensor = torch.empty(shape, dtype=dtype, device="cpu")
        read_entries(self._reader, self._metadata, {f"model/{name}": whole(tensor)})
        return tensor


def load_sharded(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The whole model of a sharded checkpoint on one CPU process, whatever layout wrote it."""
    tensors = ShardedTensors(path)
    return tensors.config, {name: tensors.read(name) for name in tensors.specs}
