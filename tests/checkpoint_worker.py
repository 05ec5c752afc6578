"""Spawned gloo ranks that save and resume sharded checkpoints, recording what a save and a resume cost each rank.

Two kinds of spec, all run in one spawn (each on a fresh group of the first ranks it needs):
- "resume": train with an evaluation right before each save (as the recipes do, both every 1000 steps),
  stop, resume into a fresh model and optimizer, and record the losses and final weights of that run
  and of a straight one.
- "io": after a step, profile one save, the final weights and one resume: the torch memory they
  allocate on top of the training state, the checkpoint bytes each rank reads (through DCP's storage
  reader), and the bytes each rank hashes.

Every save and resume runs under `torch.device("meta")`: a tensor megaolmo creates for a collective
without placing it on the mesh's device lands on meta there and the collective fails, as a CPU tensor
does under NCCL.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from gloo_groups import run_each_on_its_group
from plan_worker import MODEL as PLANNED_MODEL
from plan_worker import VOCAB, peak_live_bytes
from torch.distributed.checkpoint import FileSystemReader
from torch.profiler import ProfilerActivity, profile

from megaolmo.checkpoint import sharded
from megaolmo.checkpoint.dcp_io import VerifyingReader
from megaolmo.config import OptimConfig, ParallelConfig
from megaolmo.model.engine import ParallelOLMo
from megaolmo.train.optim import build_optimizer

SEQ_LEN, GLOBAL_BATCH = 32, 8
MODEL = dataclasses.replace(PLANNED_MODEL, max_sequence_length=SEQ_LEN)  # the planner tests' model, shorter


@dataclass
class Spec:
    name: str
    kind: str  # resume | io
    parallel: dict = field(default_factory=dict)
    micro_batch_size: int = 1

    @property
    def world_size(self) -> int:
        p = self.parallel
        return p.get("tp", 1) * p.get("pp", 1) * p.get("dp", 1)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(step))
    return ids[:, :-1], ids[:, 1:]


def build(spec: Spec) -> tuple[ParallelOLMo, torch.optim.Optimizer]:
    model = ParallelOLMo(MODEL, ParallelConfig(**spec.parallel), seed=0)
    return model, build_optimizer(model.named_parameters(), OptimConfig(lr=1e-3), model.mesh.device)


def rows(model: ParallelOLMo, tensor: torch.Tensor) -> torch.Tensor:
    share = GLOBAL_BATCH // model.mesh.dp
    return tensor[model.mesh.dp_rank * share : (model.mesh.dp_rank + 1) * share]


def train_step(model: ParallelOLMo, optimizer: torch.optim.Optimizer, step: int, micro_batch_size: int) -> float:
    ids, labels = batch(step)
    optimizer.zero_grad(set_to_none=True)
    losses = model.forward_backward(rows(model, ids), rows(model, labels), micro_batch_size)
    model.clip_grad_norm_(1.0)
    optimizer.step()
    return losses.ce


def evaluate(model: ParallelOLMo, micro_batch_size: int) -> float:
    ids, labels = batch(10_000)
    loss, tokens = model.evaluate(rows(model, ids), rows(model, labels), micro_batch_size)
    return loss / tokens


def save(model: ParallelOLMo, optimizer: torch.optim.Optimizer, directory: Path, step: int) -> Path:
    with torch.device("meta"):
        return sharded.save_sharded(directory, step, model=model, optimizer=optimizer, trainer_state={"step": step},
                                    keep_last=2, keep_every=None)  # fmt: skip


def restore(path: Path, model: ParallelOLMo, optimizer: torch.optim.Optimizer) -> None:
    with torch.device("meta"):
        sharded.restore_sharded(path, model, optimizer)


def resume_run(spec: Spec, target: Path) -> None:
    """Losses and evaluations of 4 steps straight, and of 2 + 2 steps with an evaluation and a save at step 2."""
    micro, record = spec.micro_batch_size, {}
    model, optimizer = build(spec)
    straight = []
    for step in range(4):
        straight.append(train_step(model, optimizer, step, micro))
        if step % 2 == 1:
            straight.append(evaluate(model, micro))
    record["straight"], expected = straight, model.full_tensors()
    del model, optimizer
    model, optimizer = build(spec)
    legs = [train_step(model, optimizer, 0, micro), train_step(model, optimizer, 1, micro), evaluate(model, micro)]
    path = save(model, optimizer, target / "checkpoints", 2)
    del model, optimizer
    model, optimizer = build(spec)
    restore(path, model, optimizer)
    legs += [train_step(model, optimizer, 2, micro), train_step(model, optimizer, 3, micro), evaluate(model, micro)]
    record["resumed"] = legs
    got = model.full_tensors()
    record["weights_equal"] = sorted(name for name in expected if torch.equal(expected[name], got[name]))
    record["weights"] = sorted(expected)
    with torch.device("meta"):
        final = sharded.save_final_weights(target / "final", model, step=4)
    if dist.get_rank() == 0:
        weights = sharded.load_sharded(final)[1]
        record["final_names"] = sorted(weights)
        record["final_equal"] = sorted(name for name in got if torch.equal(weights[name], got[name]))
    (target / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))


class _Counted:
    """Checkpoint bytes this rank reads through DCP's reader, and bytes it hashes: the items it checks as
    it reads them, and whole files (the small metadata and trainer state)."""

    def __init__(self) -> None:
        self.read = self.hashed_data = self.hashed_other = 0

    def __enter__(self) -> _Counted:  # noqa: PYI034 - a plain class
        self._originals = FileSystemReader.read_data, VerifyingReader._slice_file, sharded._file_digest
        read_data, slice_file, file_digest = self._originals
        counts = self

        def counted_read_data(reader, plan, planner):
            counts.read += sum(reader.storage_data[item.storage_index].length for item in plan.items)
            return read_data(reader, plan, planner)

        def counted_slice_file(reader, file, sinfo):
            counts.hashed_data += sinfo.length
            return slice_file(reader, file, sinfo)

        def counted_file_digest(path: Path) -> dict:
            counts.hashed_other += path.stat().st_size
            return file_digest(path)

        FileSystemReader.read_data, VerifyingReader._slice_file = counted_read_data, counted_slice_file
        sharded._file_digest = counted_file_digest
        return self

    def __exit__(self, *exc) -> None:
        FileSystemReader.read_data, VerifyingReader._slice_file, sharded._file_digest = self._originals


def _share_bytes(model: ParallelOLMo, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Bytes of this rank's share of the checkpoint, and of the largest unsharded tensor in it."""
    entries = sharded.training_entries(model, optimizer)
    shares = [entry for entry in entries.values() if isinstance(entry, sharded.Share)]
    largest = max(share.pieces[0].local.element_size() * torch.Size(share.shape).numel() for share in shares)
    return sum(share.nbytes for share in shares), largest


def io_run(spec: Spec, target: Path) -> None:
    """Peak extra memory, bytes read and bytes hashed of one save and one resume on this rank."""
    model, optimizer = build(spec)
    train_step(model, optimizer, 0, spec.micro_batch_size)
    share, largest = _share_bytes(model, optimizer)
    record = {"share": share, "largest_tensor": largest}
    with _Counted() as counts, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        path = save(model, optimizer, target / "checkpoints", 1)
    record.update(save_peak=peak_live_bytes(prof), save_rehashed=counts.hashed_data + counts.hashed_other)
    record["written"] = sum(p.stat().st_size for p in path.glob(f"__{dist.get_rank()}_*.distcp"))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.device("meta"):
        sharded.save_final_weights(target / "final", model, step=1)
    record["final_peak"] = peak_live_bytes(prof)
    expected = model.full_tensors()
    del model, optimizer
    model, optimizer = build(spec)
    train_step(model, optimizer, 1, spec.micro_batch_size)  # the optimizer state exists, as when resuming a run
    with _Counted() as counts, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        restore(path, model, optimizer)
    record.update(load_peak=peak_live_bytes(prof), load_read=counts.read, load_hashed=counts.hashed_data,
                  load_hashed_other=counts.hashed_other)  # fmt: skip
    got = model.full_tensors()
    record["restored"] = all(torch.equal(expected[name], got[name]) for name in expected)
    (target / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))


def run_specs(rank: int, nprocs: int, specs: list[dict], out_dir: str) -> None:
    del nprocs
    work = {"resume": resume_run, "io": io_run}
    run_each_on_its_group(rank, [Spec(**spec) for spec in specs], out_dir, lambda s, t: work[s.kind](s, t))
