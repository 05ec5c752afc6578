"""Spawned gloo ranks running `python -m megaolmo.eval` on a model sharded over several TP x PP x DP layouts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gloo_groups import run_each_on_its_group

from megaolmo.eval.__main__ import build_parser, run


@dataclass
class Layout:
    name: str
    tp: int
    pp: int
    world_size: int
    cp: int = 1


def evaluate(layout: Layout, target: Path, inputs: dict[str, str]) -> None:
    """Both commands, as the CLI runs them, on this layout; rank 0 writes `<command>.json` in `target`."""
    common = [
        "--tokenizer",
        inputs["tokenizer"],
        "--tp",
        str(layout.tp),
        "--pp",
        str(layout.pp),
        "--cp",
        str(layout.cp),
    ]
    common += ["--device", "cpu", "--batch-size", "2", "--no-progress"]
    commands = {
        "perplexity": ["perplexity", inputs["checkpoint"], inputs["documents"], "--per-document"],
        "downstream": ["downstream", inputs["checkpoint"], inputs["task"], "--per-example"],
    }
    for name, command in commands.items():
        run(build_parser().parse_args([*command, *common, "--out", str(target / f"{name}.json")]))


def run_layouts(rank: int, layouts: list[dict], inputs: dict[str, str], out_dir: str) -> None:
    """Entry point of each spawned rank: every layout in turn on a fresh gloo group of its first ranks."""
    layouts = [Layout(**layout) for layout in layouts]
    run_each_on_its_group(rank, layouts, out_dir, lambda layout, target: evaluate(layout, target, inputs))
