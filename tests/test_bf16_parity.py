"""One process computes in bf16 what a cluster computes: the same mixed precision (FSDP's: bf16 copies of the
fp32 master weights, a bf16 activation stream, fp32 gradients) on every layout (CPU, gloo)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from bf16_worker import Run, bf16_losses, run_layouts
from gloo_groups import spawn

LAYOUTS = [
    Run("dp2", {"dp": 2}),
    Run("pp2_dp2", {"pp": 2, "dp": 2}),
    Run("tp2_pp2_dp2_sp", {"tp": 2, "pp": 2, "dp": 2, "sequence_parallel": True}),
    # The ring merges each query's bf16 block outputs in fp32 and rounds once, as one kernel does.
    Run("cp2_tp2_pp2_sp", {"cp": 2, "tp": 2, "pp": 2, "sequence_parallel": True}),
]
# bf16 keeps 8 significant bits (a unit roundoff of 2**-8 = 3.9e-3). The first loss is a forward of the same
# weights: without TP every layout runs the same bf16 operations on the same rows, and only the fp32 sums
# of the loss over micro-batches and DP ranks are ordered differently; TP adds one bf16 rounding, where
# the row-parallel linears' partial sums meet, which the mean over tokens averages down. After that, the
# gradients are reduced in other orders too and AdamW carries it on: a fraction of a roundoff, on a loss.
# (An fp32 residual stream, as autocast keeps in one process, differs by 4e-5 at the first forward.)
FIRST_STEP = {False: 1e-6, True: 2**-8 / 4}
LATER_STEPS = 2**-8 / 2


@pytest.fixture(scope="module")
def losses(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    out = tmp_path_factory.mktemp("bf16")
    spawn(run_layouts, (8, [dataclasses.asdict(run) for run in LAYOUTS], str(out)), 8)
    found = {"one process": bf16_losses({})}
    for run in LAYOUTS:
        errors = sorted((out / run.name).glob("rank*.error"))
        if errors:
            pytest.fail(errors[0].read_text())
        found[run.name] = json.loads(Path(out / run.name / "losses.json").read_text())
    return found


@pytest.mark.parametrize("run", LAYOUTS, ids=lambda run: run.name)
def test_bf16_layouts_train_like_one_process(losses: dict[str, list[float]], run: Run) -> None:
    one, many = losses["one process"], losses[run.name]
    assert abs(many[0] - one[0]) <= FIRST_STEP["tp" in run.parallel] * one[0], (one, many)
    for a, b in zip(one[1:], many[1:], strict=True):
        assert abs(b - a) <= LATER_STEPS * a, (one, many)
