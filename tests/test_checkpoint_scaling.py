"""Checkpoints that hold at scale, proven on CPU: what a save and a resume cost each rank, and that a
checkpoint written right after an evaluation resumes exactly under ZeRO-2 and ZeRO-3 (gloo ranks)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from checkpoint_worker import GLOBAL_BATCH, MODEL, SEQ_LEN, Spec, run_specs
from gloo_groups import spawn, spawned_results
from helpers import resolved_model

from megaolmo.checkpoint.consolidated import expected_shapes
from megaolmo.config import ParallelConfig
from megaolmo.plan.layout import Layout, Placement, Workload
from megaolmo.plan.memory import checkpoint_share, checkpoint_transient

ZERO2 = {"reshard_after_forward": False}
# The recipes' layouts at tiny size: fsdp_zero2 (OLMo 1B and 7B) and tp8_pp4_vp2 / vp4 (65B).
RESUME_SPECS = [
    Spec("zero2_dp2", "resume", {"dp": 2, **ZERO2}),
    Spec("zero3_dp2", "resume", {"dp": 2}),
    Spec("zero2_dp4", "resume", {"dp": 4, **ZERO2}),
    Spec("zero2_tp2_pp2_vp2_dp2_sp", "resume", {
        "tp": 2, "pp": 2, "vp": 2, "dp": 2, "pp_schedule": "interleaved_1f1b", "sequence_parallel": True, **ZERO2,
    }),
]  # fmt: skip
IO_SPECS = [
    Spec("io_dp2", "io", {"dp": 2, **ZERO2}),
    Spec("io_dp4", "io", {"dp": 4, **ZERO2}),
    Spec("io_tp2_dp2", "io", {"tp": 2, "dp": 2, **ZERO2}),
]
SPECS = RESUME_SPECS + IO_SPECS


def _spawn(specs: list[Spec], out: Path) -> None:
    nprocs = max(spec.world_size for spec in specs)
    spawn(run_specs, (nprocs, [dataclasses.asdict(spec) for spec in specs], str(out)), nprocs)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Spec], list[dict]]:
    """Every spec's per-rank records, from one spawn of 8 ranks."""
    directory = spawned_results(tmp_path_factory.mktemp("checkpoints"), SPECS, lambda spec: "all", _spawn)

    def records(spec: Spec) -> list[dict]:
        target = directory(spec)
        errors = sorted(target.glob("rank*.error"))
        if errors:
            pytest.fail(errors[0].read_text())
        return [json.loads((target / f"rank{rank}.json").read_text()) for rank in range(spec.world_size)]

    return records


@pytest.mark.parametrize("spec", RESUME_SPECS, ids=lambda spec: spec.name)
def test_save_after_evaluation_resumes_bitwise(results, spec: Spec) -> None:
    """Evaluation right before the save (the recipes do both every 1000 steps), then a resume into a
    fresh model: the losses, evaluations, weights and final weights equal a straight run's, bit for bit."""
    records = results(spec)
    for record in records:
        assert record["resumed"] == record["straight"]
        assert record["weights_equal"] == record["weights"]
    model = resolved_model(MODEL, ParallelConfig(**spec.parallel), spec.world_size)
    assert sorted(records[0]["final_names"]) == sorted(expected_shapes(model))
    assert records[0]["final_equal"] == sorted(set(records[0]["final_names"]) & set(records[0]["weights"]))


@pytest.mark.parametrize("spec", IO_SPECS, ids=lambda spec: spec.name)
def test_each_rank_saves_and_resumes_its_share_only(results, spec: Spec) -> None:
    """Per rank: the memory a save or a resume adds to the training state is at most ~1.5x the largest
    single tensor (not a copy of the model), and it reads, writes and hashes ~its own share."""
    for record in results(spec):
        assert record["restored"]
        bound = 1.5 * record["largest_tensor"]
        assert record["save_peak"] <= bound, record
        assert record["final_peak"] <= bound, record  # final weights too: nothing gathered on one rank
        assert record["load_peak"] <= bound, record
        share = record["share"]
        assert record["written"] <= 1.25 * share, record  # hashed as it is written: never read back
        assert record["save_rehashed"] == 0, record
        assert record["load_read"] <= 1.25 * share, record
        assert record["load_hashed"] <= 1.25 * share, record


def test_what_a_rank_reads_writes_and_holds_shrinks_with_dp(results) -> None:
    """From DP2 to DP4 each rank's share halves, and so do the bytes it writes and reads and the memory a
    resume adds (the saved chunks it reads are its share's): the cost follows the shard, not the model."""
    dp2, dp4 = (results(spec) for spec in IO_SPECS[:2])

    def mean(records: list[dict], key: str) -> float:
        return sum(record[key] for record in records) / len(records)

    for key in ("share", "written", "load_read", "load_peak"):
        assert mean(dp4, key) <= 0.55 * mean(dp2, key), (key, mean(dp4, key), mean(dp2, key))


@pytest.mark.parametrize("spec", IO_SPECS, ids=lambda spec: spec.name)
def test_the_planner_knows_what_a_checkpoint_costs_a_rank(results, spec: Spec) -> None:
    """`python -m megaolmo.plan`'s checkpoint share and transient are the measured ones."""
    work = Workload(MODEL, SEQ_LEN, GLOBAL_BATCH, False, "cpu", MODEL.kernels, False, False)
    placement = Placement(work, Layout(micro_batch_size=spec.micro_batch_size, **spec.parallel))
    (rank,) = placement.ranks()
    records = results(spec)
    share = max(record["share"] for record in records)
    assert abs(checkpoint_share(placement, rank) / share - 1) <= 0.02
    peak = max(record["load_peak"] for record in records)
    assert abs(checkpoint_transient(placement, rank) / peak - 1) <= 0.10
