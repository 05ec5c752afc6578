"""`python -m megaolmo.plan [--search] [--top N] [--dry-run [--rank R ...]] [hydra overrides ...]`: plan a layout.

Composes the same Hydra config as megaolmo.train (conf/config.yaml with the
same overrides, e.g. `experiment=olmo_65b`), then prints the plan of the
configured layout on the configured cluster, or with --search the fastest
feasible layouts. Exit status: 0 when the layout fits, 1 when it does not (or
no layout does), 2 for a configuration megaolmo cannot run. With --dry-run it
builds chosen ranks' stages on the meta device under a fake process group of
the cluster's world size (megaolmo/plan/dry_run.py) and exits 0 when what they
hold equals the plan, 1 when it does not.
"""

from __future__ import annotations

import argparse
import sys

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megaolmo.config import CONF_DIR, Config
from megaolmo.errors import ConfigError, MegaolmoError, report
from megaolmo.plan import make_plan
from megaolmo.plan.dry_run import dry_run
from megaolmo.plan.hardware import Hardware
from megaolmo.plan.layout import Layout, Workload
from megaolmo.plan.report import format_plan, format_table, refusal
from megaolmo.plan.search import candidate_layouts, search


def compose_config(overrides: list[str]) -> Config:
    """The typed config megaolmo.train would run with these overrides."""
    ConfigStore.instance().store(name="megaolmo_schema", node=Config)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    cfg.trainer.run_dir = "."  # ${hydra:runtime.output_dir} exists only in a Hydra run; the planner writes nothing
    return OmegaConf.to_object(cfg)


def _title(overrides: list[str], config: Config) -> str:
    chosen = [o for o in overrides if o.split("=")[0] in ("experiment", "model")]
    return " ".join(chosen) if chosen else f"model d_model={config.model.d_model} n_layers={config.model.n_layers}"


def _setup(overrides: list[str]) -> tuple[Config, Workload, Hardware]:
    config = compose_config(overrides)
    cluster = config.cluster
    device = config.parallel.device
    if device == "auto":
        device = "cuda" if cluster.gpus_per_node > 0 else "cpu"
    work = Workload.from_config(config, device)
    return config, work, Hardware.from_cluster(cluster, device, work.bf16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megaolmo.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--search",
        action="store_true",
        help="rank every feasible layout (tp, cp, pp, vp, dp, micro-batch, recompute, ZeRO) by predicted step time",
    )
    parser.add_argument("--top", type=int, default=10, help="layouts --search prints (default 10)")
    parser.add_argument(
        "--dry-run", action="store_true", help="build ranks on the meta device and compare them with the plan"
    )
    parser.add_argument(
        "--rank", type=int, action="append", help="a global rank --dry-run builds (repeatable; default: 0 and the last)"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for megaolmo.train")
    args = parser.parse_args(argv)
    try:
        config, work, hardware = _setup(args.overrides)
        title = _title(args.overrides, config)
        if args.search:
            plans = search(work, hardware)
            print(format_table(plans, title, args.top, sum(1 for _ in candidate_layouts(work, hardware))))
            return 0 if plans else 1
        try:
            layout = Layout.from_config(config, hardware.world_size)
        except ConfigError as err:
            raise ConfigError(
                f"the cluster has {hardware.world_size} GPUs (cluster.nodes={hardware.nodes} x "
                f"{hardware.devices_per_node} per node): {err}"
            ) from None
        plan = make_plan(work, layout, hardware)
        if args.dry_run:
            table, equal = dry_run(plan.placement, config, args.rank)
            print(f"dry run of {title} on {layout.world_size} ranks: {layout.describe()}\n{table}")
            return 0 if equal else 1
    except MegaolmoError as err:
        return report(err)
    except (HydraException, OmegaConfBaseException) as err:  # an override Hydra cannot compose
        return report(ConfigError(str(err)))
    print(format_plan(plan, title))
    if not plan.fits:
        print(f"error: {refusal(plan)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
