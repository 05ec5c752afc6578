"""`python -m megaolmo.plan --dry-run`: build chosen ranks' real stages at the real world size, compare with the plan.

Each chosen global rank is built in a fresh process (a process can init the default group only once): torch's
fake process group at the config's world size (`dist.init_process_group("fake", ...)`, as torchtitan's dry run
does; no rank exists but this one, and every collective is a no-op), the start-up checks of a training run
(`megaolmo.config.resolve`), the mesh authority (`ParallelMesh`) and this rank's stages cut, TP-sharded and
FSDP2-wrapped on the meta device, so nothing is allocated even for 65B on 512 ranks. What FSDP2 holds is then
compared with the planner's figures: parameters, fp32 weight, gradient and AdamW bytes, the blocks of each
stage module, the CP degree and rank, and the ranks FSDP2 shards over (dp x cp).

The stages are the ones `parallelize_olmo` builds for training, with `materialize=False`: left on the meta
device, neither initialized nor swapped to FP8 (which keeps every weight's shape; Transformer Engine needs a GPU).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard

from megaolmo.config import Config, Fp8Config, ResolvedLayout, resolve
from megaolmo.errors import ConfigError
from megaolmo.model.olmo import OLMo
from megaolmo.model.parallelize import parallelize_olmo
from megaolmo.parallel.mesh import ParallelMesh
from megaolmo.parallel.pipeline import stage_layer_ranges, stages_of_rank
from megaolmo.plan.hardware import GIB
from megaolmo.plan.layout import Placement
from megaolmo.plan.memory import checkpoint_share, plan_memory
from megaolmo.tables import format_table


@dataclass(frozen=True)
class BuiltRank:
    """What one global rank built: its pipeline coordinates, the blocks of its stage modules, and its parameters."""

    rank: int
    pp_rank: int
    stage_ids: tuple[int, ...]
    blocks: tuple[tuple[int, ...], ...]  # block indices of each stage module, in pipeline order
    params: int  # elements of this rank's FSDP2 shards, padded as FSDP2 allocates them
    weight_bytes: int  # those shards at the dtype FSDP2 keeps (the master copy)
    unsharded_params: int  # elements after TP, before DP
    cp: int = 1  # the mesh's CP degree
    cp_rank: int = 0
    shard_degree: int = 1  # ranks of FSDP2's shard mesh: dp x cp (one process: 1)


@dataclass(frozen=True)
class Expected:
    """The planner's figures for one global rank."""

    pp_rank: int
    stage_ids: tuple[int, ...]
    blocks: tuple[tuple[int, ...], ...]
    params: int
    unsharded_params: int
    weight_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    checkpoint_bytes: float
    cp: int = 1
    cp_rank: int = 0
    shard_degree: int = 1


def default_ranks(world_size: int) -> list[int]:
    """Global rank 0 (first pipeline stage) and the last rank (last pipeline stage, last TP and DP rank)."""
    return sorted({0, world_size - 1})


def build_stages(layout: ResolvedLayout, mesh: ParallelMesh, param_dtype: torch.dtype) -> list[tuple[int, OLMo]]:
    """This rank's (stage id, stage module) on the meta device, cut and sharded by parallelize_olmo itself."""
    stages = parallelize_olmo(layout, mesh, seed=0, param_dtype=param_dtype, fp8=Fp8Config(), materialize=False)
    return list(zip(stages.ids, stages.modules))


def _measure(stage: OLMo) -> tuple[int, int, int]:
    """(padded shard elements, their bytes, unsharded elements) of a stage's parameters, read off FSDP2's state."""
    if not isinstance(stage, FSDPModule):  # one process: plain parameters
        numel = sum(p.numel() for p in stage.parameters())
        return numel, sum(p.numel() * p.element_size() for p in stage.parameters()), numel
    params = weight = unsharded = 0
    for module in stage.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = fully_shard.state(module)._fsdp_param_group
        for fsdp_param in group.fsdp_params if group is not None else []:
            padded = fsdp_param.padded_sharded_param_size.numel()
            params += padded
            weight += padded * fsdp_param.sharded_param.element_size()
            unsharded += fsdp_param.sharded_param.numel()  # a DTensor's numel is the whole (TP-local) tensor's
    return params, weight, unsharded


def build_rank(config: Config, rank: int, world_size: int) -> BuiltRank:
    """Build global rank `rank` of `world_size` under a fake process group; call once per process."""
    if world_size > 1:
        # Registers the "fake" backend: a group of `world_size` that holds nothing per rank and whose
        # collectives do nothing (FSDP2's init runs none on meta anyway). Only a dry run's worker imports it.
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    run = resolve(config, world_size)
    mesh = ParallelMesh(dataclasses.replace(config.parallel, device="cpu"))  # the fake group needs no GPU
    param_dtype = torch.bfloat16 if config.trainer.precision == "bf16" else torch.float32
    stages = build_stages(run.layout, mesh, param_dtype)
    figures = [_measure(stage) for _, stage in stages]
    return BuiltRank(
        rank=rank,
        pp_rank=mesh.pp_rank,
        stage_ids=tuple(stage_id for stage_id, _ in stages),
        blocks=tuple(tuple(int(i) for i in stage.blocks) for _, stage in stages),
        params=sum(f[0] for f in figures),
        weight_bytes=sum(f[1] for f in figures),
        unsharded_params=sum(f[2] for f in figures),
        cp=mesh.cp,
        cp_rank=mesh.cp_rank,
        shard_degree=mesh.shard_mesh.size() if mesh.shard_mesh is not None else 1,
    )


def build_ranks(config: Config, ranks: list[int], world_size: int) -> list[BuiltRank]:
    """Build each rank in its own `python -m megaolmo.plan.dry_run` process, up to one per CPU at a time."""
    built: list[BuiltRank] = []
    width = max(1, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.pkl"
        path.write_bytes(pickle.dumps(config))
        for start in range(0, len(ranks), width):
            command = [sys.executable, "-m", "megaolmo.plan.dry_run", str(path), str(world_size)]
            procs = [
                (rank, subprocess.Popen([*command, str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE))
                for rank in ranks[start : start + width]
            ]
            for rank, proc in procs:
                out, err = proc.communicate()
                if proc.returncode != 0:
                    raise RuntimeError(f"the dry run of rank {rank} failed:\n{err.decode(errors='replace')}")
                built.append(BuiltRank(**pickle.loads(out)))
    return built


def expected(placement: Placement, rank: int) -> Expected:
    """The planner's figures for global rank `rank` (Megatron order, TP fastest, then CP, DP and PP:
    rank = ((pp_rank x dp + dp_rank) x cp + cp_rank) x tp + tp_rank)."""
    layout = placement.layout
    pp_rank = rank // (layout.dp * layout.cp * layout.tp)
    pipeline_rank = placement.ranks()[pp_rank]
    memory = plan_memory(placement)[pp_rank]
    items = next(moment for moment in memory.moments if moment.name == "optimizer step").items
    ranges = stage_layer_ranges(placement.stage_layers)
    ids = tuple(stages_of_rank(pp_rank, layout.pp, layout.vp))
    return Expected(
        pp_rank=pp_rank,
        stage_ids=ids,
        blocks=tuple(tuple(ranges[i]) for i in ids),
        params=placement.sharded_params(pipeline_rank),
        unsharded_params=placement.unsharded_params(pipeline_rank),
        weight_bytes=_item(items, "weights ("),
        grad_bytes=_item(items, "gradients ("),
        optimizer_bytes=_item(items, "optimizer states ("),
        checkpoint_bytes=checkpoint_share(placement, pipeline_rank),
        cp=layout.cp,
        cp_rank=rank // layout.tp % layout.cp,
        shard_degree=layout.shard_degree if placement.fsdp else 1,
    )


def _item(items: dict[str, float], prefix: str) -> float:
    return next(value for key, value in items.items() if key.startswith(prefix))


def mismatches(built: BuiltRank, plan: Expected) -> list[str]:
    """Each figure of the built rank that differs from the planner's, as 'what: built vs planned'."""
    # FSDP2's sharded gradients and each AdamW moment (zeros_like the parameter) take the shards' dtype and size.
    grads = optimizer = built.weight_bytes
    figures = {
        "pp rank": (built.pp_rank, plan.pp_rank),
        "cp": (built.cp, plan.cp),
        "cp rank": (built.cp_rank, plan.cp_rank),
        "FSDP shard ranks": (built.shard_degree, plan.shard_degree),
        "stages": (built.stage_ids, plan.stage_ids),
        "blocks": (built.blocks, plan.blocks),
        "params": (built.params, plan.params),
        "unsharded params": (built.unsharded_params, plan.unsharded_params),
        "weight bytes": (built.weight_bytes, plan.weight_bytes),
        "gradient bytes": (grads, plan.grad_bytes),
        "optimizer bytes": (2 * optimizer, plan.optimizer_bytes),
        "checkpoint bytes": (built.weight_bytes + 2 * optimizer, plan.checkpoint_bytes),
    }
    return [f"{name}: built {mine} vs planned {theirs}" for name, (mine, theirs) in figures.items() if mine != theirs]


def _blocks(blocks: tuple[tuple[int, ...], ...]) -> str:
    return ",".join(f"{b[0]}-{b[-1]}" if b else "none" for b in blocks)


def dry_run(placement: Placement, config: Config, ranks: list[int] | None = None) -> tuple[str, bool]:
    """Build `ranks` (default: rank 0 and the last) and compare them with `placement`; (the table, all equal)."""
    world_size = placement.layout.world_size
    ranks = default_ranks(world_size) if ranks is None else ranks
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise ConfigError(f"--rank {bad[0]} is outside the {world_size} ranks of this layout; use 0..{world_size - 1}")
    rows, ok = [], True
    for built in build_ranks(config, ranks, world_size):
        plan = expected(placement, built.rank)
        wrong = mismatches(built, plan)
        ok = ok and not wrong
        rows.append(
            {
                "rank": built.rank,
                "pp rank": built.pp_rank,
                "stages": ",".join(map(str, built.stage_ids)),
                "layers": _blocks(built.blocks),
                "cp rank": f"{built.cp_rank} of {built.cp}",
                "params": f"{built.params:,}",
                "weights GiB": f"{built.weight_bytes / GIB:.3f}",
                "grads GiB": f"{built.weight_bytes / GIB:.3f}",
                "optimizer GiB": f"{2 * built.weight_bytes / GIB:.3f}",
                "planner params": f"{plan.params:,}",
                "verdict": "equal" if not wrong else "MISMATCH: " + "; ".join(wrong),
            }
        )
    return format_table(rows), ok


def main() -> None:
    """The worker: `CONFIG_PICKLE WORLD_SIZE RANK` on the command line, the pickled BuiltRank's fields on stdout."""
    path, world_size, rank = sys.argv[1:]
    config = pickle.loads(Path(path).read_bytes())
    built = build_rank(config, int(rank), int(world_size))
    sys.stdout.buffer.write(pickle.dumps(dataclasses.asdict(built)))  # plain values: no class of `__main__`


if __name__ == "__main__":
    main()
