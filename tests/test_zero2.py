"""ZeRO-2 all-gathers each FSDP unit once per step, and evaluation leaves the training state sharded (CPU, gloo).

One spawn of four ranks runs every case, each on the first ranks it needs (gloo_groups): two AdamW
steps of four micro-batches per DP rank at dp 2, with `evaluate` between them, under ZeRO-2 and ZeRO-3,
with and without PP, in bf16 (so a gathered parameter differs from its fp32 shard in dtype as well as
shape). The all-gathers are counted where FSDP2 issues them: `foreach_all_gather` makes one
`torch.distributed.all_gather_single` call per unit it gathers (torch 2.13,
fsdp/_fully_shard/_fsdp_collectives.py); nothing else all-gathers in these steps (tp 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_groups import run_each_on_its_group, spawn
from helpers import small_model
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from megaolmo.config import ParallelConfig
from megaolmo.model.engine import ParallelOLMo
from megaolmo.plan.comm import dp_gathers_per_step
from megaolmo.plan.layout import Layout, Placement, Workload

DP, GLOBAL_BATCH, SEQ_LEN, MICRO_BATCH, STEPS = 2, 8, 16, 1, 2  # 4 micro-batches per DP rank
MODEL = small_model(max_sequence_length=SEQ_LEN, kernels="torch")


@dataclass
class Case:
    name: str
    pp: int
    reshard_after_forward: bool  # ZeRO-3 (True) or ZeRO-2

    @property
    def world_size(self) -> int:
        return DP * self.pp

    def layout(self) -> Layout:
        return Layout(pp=self.pp, dp=DP, micro_batch_size=MICRO_BATCH, reshard_after_forward=self.reshard_after_forward)


CASES = [
    Case("zero2", pp=1, reshard_after_forward=False),
    Case("zero3", pp=1, reshard_after_forward=True),
    Case("pp2_zero2", pp=2, reshard_after_forward=False),
    Case("pp2_zero3", pp=2, reshard_after_forward=True),
]
BY_NAME = {case.name: case for case in CASES}


@contextmanager
def counted_all_gathers() -> Iterator[list[int]]:
    """The number of FSDP all-gathers issued inside the block, in a one-element list."""
    count = [0]
    original = dist.all_gather_single

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    dist.all_gather_single = counting
    try:
        yield count
    finally:
        dist.all_gather_single = original


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, MODEL.vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=generator)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = -100
    return input_ids, labels


def train_and_evaluate(case: Case, target: Path) -> None:
    """STEPS steps with `evaluate` after the first: gathers per step, losses, what evaluation leaves behind,
    and this rank's final fp32 shards."""
    parallel = ParallelConfig(device="cpu", dp=DP, pp=case.pp, reshard_after_forward=case.reshard_after_forward)
    model = ParallelOLMo(MODEL, parallel, seed=7, param_dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    input_ids, labels = global_batch()
    share = GLOBAL_BATCH // DP
    rows = slice(model.mesh.dp_rank * share, (model.mesh.dp_rank + 1) * share)
    record: dict = {"gathers": [], "ce": [], "pp_rank": model.mesh.pp_rank}
    record["units"] = sum(isinstance(m, FSDPModule) for stage in model.stages for m in stage.modules())
    for step in range(STEPS):
        optimizer.zero_grad()
        with counted_all_gathers() as gathers:
            losses = model.forward_backward(input_ids[rows], labels[rows], MICRO_BATCH)
        optimizer.step()
        record["gathers"].append(gathers[0])
        record["ce"].append(losses.ce)
        if step == 0:
            record["eval"] = model.evaluate(input_ids[rows], labels[rows], MICRO_BATCH)
            params = model.named_parameters()
            record["unsharded_after_eval"] = [
                name for name, p in params if not (isinstance(p, DTensor) and p.dtype == torch.float32)
            ]
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            record["optimizer_holds_them"] = {id(p) for _, p in params} == held
    record["shards"] = {name: p.to_local().detach().clone() for name, p in model.named_parameters()}
    torch.save(record, target / f"rank{dist.get_rank()}.pt")


def run_cases(rank: int, cases: list[dict], out_dir: str) -> None:
    """Entry point of each spawned rank."""
    run_each_on_its_group(rank, [Case(**case) for case in cases], out_dir, train_and_evaluate)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], list[dict]]:
    """Every case in one spawn; the records of a case's ranks, by rank, once it ran without error."""
    out = tmp_path_factory.mktemp("zero2")
    spawn(run_cases, ([dataclasses.asdict(case) for case in CASES], str(out)), max(c.world_size for c in CASES))

    def records(name: str) -> list[dict]:
        directory = out / name
        errors = sorted(directory.glob("*.error"))
        assert not errors, errors[0].read_text()
        return [torch.load(directory / f"rank{r}.pt") for r in range(BY_NAME[name].world_size)]

    return records


def planned_gathers(case: Case, pp_rank: int) -> float:
    """All-gathers per step on a rank of `case` as the planner counts them: its blocks' and its root unit's."""
    work = Workload(
        MODEL, SEQ_LEN, GLOBAL_BATCH, bf16=True, device="cpu", kernels="torch", fused_adam=False, decay_embeddings=False
    )
    placement = Placement(work, case.layout())
    blocks, root = dp_gathers_per_step(placement)
    rank = placement.ranks()[pp_rank]
    return rank.layers * blocks + root


def test_zero2_gathers_each_unit_once_per_step(results) -> None:
    """Without PP, ZeRO-2 keeps the gathered weights from one micro-batch to the next: one all-gather per
    unit per step (each unit is gathered at least once, so a total of one per unit is one each). Before, it
    gathered again after each micro-batch's backward: 4 per unit."""
    for record in results("zero2"):
        assert record["units"] == 3  # the root (embedding, tied head) and 2 blocks
        assert record["gathers"] == [record["units"]] * STEPS


def test_planner_counts_the_gathers_the_code_does(results) -> None:
    """ZeRO-2: once per step with or without PP. ZeRO-3: every unit (the root too) in forward and in backward
    of each micro-batch without PP; m + 1 times with PP, where a backward leaves its units gathered."""
    for case in CASES:
        for record in results(case.name):
            assert record["gathers"] == [planned_gathers(case, record["pp_rank"])] * STEPS, case.name
    assert results("zero3")[0]["gathers"][0] == 3 * 2 * 4


@pytest.mark.parametrize("pp", [1, 2])
def test_zero2_trains_exactly_like_zero3(pp: int, results) -> None:
    """Keeping the gathered weights changes no arithmetic: the same losses (evaluation included) and the same
    fp32 shards after two steps, bitwise, on every rank."""
    prefix = "pp2_" if pp == 2 else ""
    for zero2, zero3 in zip(results(prefix + "zero2"), results(prefix + "zero3")):
        assert zero2["ce"] == zero3["ce"]
        assert zero2["eval"] == zero3["eval"]
        assert zero2["shards"].keys() == zero3["shards"].keys()
        for name, shard in zero2["shards"].items():
            assert torch.equal(shard, zero3["shards"][name]), name


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_evaluation_leaves_the_parameters_sharded(name: str, results) -> None:
    """After `evaluate` (through `row_losses`) every parameter is the fp32 DTensor shard the optimizer holds,
    not a gathered bf16 copy, and the step after it trains (its loss falls, its gathers counted above)."""
    for record in results(name):
        assert record["unsharded_after_eval"] == []
        assert record["optimizer_holds_them"]
        assert record["ce"][1] < record["ce"][0]
