"""Hydra multiruns: a run directory per point named after what the sweep varies, and a closing table.

`python -m megaolmo.train -m optim.lr=1e-3,3e-3 ...` puts each point in
<sweep dir>/optim.lr=0.001/ and so on: only the swept keys name the directory
(Hydra's own override_dirname lists every override and soon passes the file
system's name limit). conf/config.yaml registers `SweepSummary` as a Hydra callback. Hydra calls
`on_multirun_end` in the process that launched the sweep, after the last point
has returned, whether the points ran here one after another (the basic
launcher) or as Slurm jobs (hydra/launcher=submitit_slurm). The points report
through their run directories (`.hydra/overrides.yaml`, `metrics.jsonl`,
`final/`), which is all that both launchers have in common.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from megaolmo.tables import write_rows

SUMMARY_FILE = "summary.csv"
POINT_RESOLVER = "megaolmo_sweep_point"  # conf/config.yaml: hydra.sweep.subdir: ${megaolmo_sweep_point:}


def point_dirname(job_overrides: list[str], sweep_dir: Path, job_num: int) -> str:
    """This point's overrides of the keys the sweep varies ("optim.lr=0.001,trainer.seed=2"). The sweep's own
    command line comes from the multirun.yaml that Hydra's sweeper saves before it launches the points; the
    job number names the point where that is unknown or nothing varies."""
    try:
        sweep_overrides = list(OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task)
    except (OSError, AttributeError):
        return str(job_num)
    parser = OverridesParser.create()
    swept = {o.get_key_element() for o in parser.parse_overrides(sweep_overrides) if o.is_sweep_override()}
    chosen = [o.input_line for o in parser.parse_overrides(job_overrides) if o.get_key_element() in swept]
    return ",".join(chosen).replace(os.sep, "_") or str(job_num)


def register_point_resolver() -> None:
    """Make ${megaolmo_sweep_point:} resolvable; it is resolved in each point's own process (local or Slurm)."""
    OmegaConf.register_new_resolver(
        POINT_RESOLVER,
        lambda *, _root_: point_dirname(
            list(_root_.hydra.overrides.task), Path(_root_.hydra.sweep.dir), _root_.hydra.job.num
        ),
        replace=True,
    )


def point_row(point_dir: Path, sweep_dir: Path) -> dict[str, object]:
    """What one point reached: its overrides, last logged step and losses, and whether it finished."""
    overrides = yaml.safe_load((point_dir / ".hydra" / "overrides.yaml").read_text()) or []
    row: dict[str, object] = dict(override.split("=", 1) for override in overrides if "=" in override)
    row["point"] = str(point_dir.relative_to(sweep_dir)) or "."
    records = []
    metrics = point_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    config = yaml.safe_load((point_dir / ".hydra" / "config.yaml").read_text())
    max_steps = config["trainer"]["max_steps"]
    if not train:
        row.update(step=0, status="failed before its first logged step")
        return row
    row.update(step=train[-1]["step"], loss=round(train[-1]["loss"], 4))
    evals = [r for r in records if any(key.startswith("eval/") for key in r)]
    if evals:
        losses = [value for key, value in evals[-1].items() if key.startswith("eval/") and key.endswith("/loss")]
        row["eval_loss"] = round(sum(losses) / len(losses), 4)
    row["status"] = "finished" if (point_dir / "final").is_dir() else f"stopped at {train[-1]['step']}/{max_steps}"
    return row


def summarize(sweep_dir: Path, since: float = 0.0) -> list[dict[str, object]]:
    """Rows for the points under `sweep_dir` that (re)started at or after `since`, best final loss first.
    Of the overrides, only those that differ between points get a column: they are what the sweep varied."""
    points = [
        overrides.parent.parent
        for overrides in sorted(sweep_dir.glob("**/.hydra/overrides.yaml"))
        if overrides.stat().st_mtime >= since
    ]
    rows = [point_row(point, sweep_dir) for point in points]
    results = ["step", "loss", "eval_loss", "status", "point"]
    keys = dict.fromkeys(key for row in rows for key in row if key not in results)
    varied = [key for key in keys if len({row.get(key) for row in rows}) > 1]
    rows = [{key: row.get(key, "-") for key in varied + results if key in varied or key in row} for row in rows]
    return sorted(rows, key=lambda row: row.get("loss", math.inf))


class SweepSummary(Callback):
    """Prints the sweep's table and writes it to <sweep dir>/summary.csv."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file times have coarser resolution on some file systems

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarize(sweep_dir, self.started)
        if not rows:
            print(f"sweep summary: no points ran under {sweep_dir}")
            return
        print(f"sweep summary: {len(rows)} point(s) under {sweep_dir}, best final training loss first")
        write_rows(rows, str(sweep_dir / SUMMARY_FILE))
