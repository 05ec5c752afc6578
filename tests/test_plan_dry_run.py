"""`python -m megaolmo.plan --dry-run`: real stages built on the meta device at the recipes' world sizes equal the plan."""

from __future__ import annotations

import dataclasses

import pytest

from megaolmo.plan.__main__ import _setup, main
from megaolmo.plan.dry_run import dry_run
from megaolmo.plan.layout import Layout, Placement


@pytest.mark.parametrize(
    ("experiment", "first", "last"),
    [
        ("olmo_1b", "0 0 0 0-15", "7 0 0 0-15"),  # DP only on 8 ranks: every rank holds every block
        ("olmo_7b", "0 0 0 0-31", "63 0 0 0-31"),
        # tp8 x pp4 x vp2 over 80 blocks: rank 0 runs stages 0 and 4, the last rank (pp rank 3) stages 3 and 7
        ("olmo_65b", "0 0 0,4 0-9,40-49", "511 3 3,7 30-39,70-79"),
        ("olmo_65b_1024", "0 0 0,4,8,12 0-4,20-24,40-44,60-64", "1023 3 3,7,11,15 15-19,35-39,55-59,75-79"),
        # OLMo-2/3: FSDP2 shards (and pads) every norm weight on its own; the planner counts them one by one
        ("olmo2_1b", "0 0 0 0-15", "7 0 0 0-15"),
        ("olmo2_7b", "0 0 0 0-31", "63 0 0 0-31"),
        ("olmo2_13b", "0 0 0 0-39", "127 0 0 0-39"),  # TP2: q_norm and k_norm split by head
        ("olmo2_32b", "0 0 0 0-63", "255 0 0 0-63"),  # TP4 with GQA: k_norm is 1024 / 4 wide
        ("olmo3_7b", "0 0 0 0-31", "63 0 0 0-31"),
        # CP8 x DP8: FSDP2 shards over all 64 (dp x cp) ranks; the last rank is CP rank 7 of DP rank 7
        ("olmo3_7b_long_context", "0 0 0 0-31", "63 0 0 0-31"),
    ],
)
def test_dry_run_of_a_recipe_equals_the_plan(
    experiment: str, first: str, last: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--dry-run", f"experiment={experiment}"]) == 0, capsys.readouterr()
    lines = capsys.readouterr().out.splitlines()
    rows = lines[3:]  # title, header, rule, then one row per built rank: rank 0 and the last
    assert [" ".join(row.split()[:4]) for row in rows] == [first, last], lines
    assert all(row.rstrip().endswith("equal") for row in rows), lines
    if experiment == "olmo3_7b_long_context":
        assert [row.split()[4:7] for row in rows] == [["0", "of", "8"], ["7", "of", "8"]], lines


def test_a_wrong_planner_figure_is_a_mismatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(Placement, "sharded_params", lambda self, rank: 1)
    assert main(["--dry-run", "--rank", "0", "experiment=olmo_1b"]) == 1
    assert "MISMATCH: params: built 147095552 vs planned 1" in capsys.readouterr().out


def test_a_wrong_layout_is_a_mismatch() -> None:
    """The planner given another pipeline split than the one built: the blocks and the parameters differ."""
    config, work, hardware = _setup(["experiment=olmo_65b"])
    split = (16, 8, 8, 8, 8, 8, 8, 16)  # rank 0 would hold 16 + 8 blocks; the recipe builds 10 + 10
    layout = dataclasses.replace(Layout.from_config(config, hardware.world_size), pp_layer_split=split)
    table, equal = dry_run(Placement(work, layout), config, [0])
    assert not equal
    assert (
        "blocks: built ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (40," in table and "params: built 129703936 vs planned" in table
    ), table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["experiment=olmo_65b", "parallel.tp=3"], "error: the cluster has 512 GPUs"),
        (["experiment=olmo_65b", "no_such_key=1"], "error: Could not override 'no_such_key'"),
        (["--rank", "512", "experiment=olmo_65b"], "error: --rank 512 is outside the 512 ranks of this layout"),
    ],
)
def test_dry_run_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--dry-run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(message), err
