"""`python -m megaolmo.train`: train OLMo on any TP x PP x DP layout, composed by Hydra from conf/.

With no arguments it trains olmo_tiny on the built-in corpus (the Python
standard library) on this machine. Launch more ranks with torchrun (or srun):

    torchrun --nproc-per-node 8 -m megaolmo.train parallel=tp2_pp2_dp2

Every start-up check runs before any process group exists (megaolmo.config.resolve);
a bad input ends with one `error:` line and exit code 2, a stop signal with a
checkpoint and exit code 75 (requeue), see megaolmo.train.preemption.
"""

from __future__ import annotations

import importlib
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from megaolmo.config import CONF_DIR, Config, ResolvedRun, resolve
from megaolmo.errors import MegaolmoError, WorldSizeError, report
from megaolmo.parallel.launch import is_rank_zero, launch_world_size, shutdown
from megaolmo.train.loop import train
from megaolmo.train.preemption import PREEMPTED_EXIT_CODE, StopRequest
from megaolmo.train.sweep import register_point_resolver

ConfigStore.instance().store(name="megaolmo_schema", node=Config)
register_point_resolver()


def resolve_launched(config: Config) -> ResolvedRun:
    """The config resolved against the ranks the launcher started; on a mismatch, the torchrun line that fits."""
    try:
        return resolve(config, launch_world_size())
    except WorldSizeError as err:
        command = f"torchrun --nproc-per-node {err.needed} -m megaolmo.train {' '.join(sys.argv[1:])}".rstrip()
        raise WorldSizeError(f"{err}; e.g. {command}", needed=err.needed) from None


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    stop_request = StopRequest()
    clean = preempted = False
    try:
        config = OmegaConf.to_object(cfg)
        preempted = train(config, resolve_launched(config), stop_request)
        clean = True
    except MegaolmoError as err:
        sys.exit(report(err))
    finally:
        stop_request.restore()
        shutdown(clean)
    if preempted:
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    if not is_rank_zero() and not any(arg.startswith("hydra.output_subdir=") for arg in sys.argv[1:]):
        sys.argv.append("hydra.output_subdir=null")  # rank 0 records the composed config; the others need not
    # Run the entry point of the importable module, not of __main__: a Slurm sweep (submitit) pickles the
    # task function, by reference when it lives in a module a job can import.
    importlib.import_module("megaolmo.train.__main__").main()
