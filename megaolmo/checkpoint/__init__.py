"""megaolmo's checkpoints: two formats on disk, and one `load` that reads either.

consolidated.py  the whole model in one safetensors file (final weights, conversions, evaluation)
sharded.py       training checkpoints: each rank writes its share of the model, AdamW state and
                 data position with torch.distributed.checkpoint; any layout resumes any other

    save_consolidated(path, config, state)          load_consolidated(path) -> (config, state)
    save_sharded(dir, step, model=, optimizer=, ...) restore_sharded(path, model, optimizer) -> state
                                                     load_sharded(path) -> (config, state), one process
    load_state_dict(path) -> (config, state)         either format
    load(path) -> OLMo                               either format, in eval mode (`megaolmo.load`)
"""

from __future__ import annotations

from pathlib import Path

import torch

from megaolmo.checkpoint.consolidated import load_consolidated, save_consolidated
from megaolmo.checkpoint.sharded import STATE_FILE, load_sharded, restore_sharded, save_sharded
from megaolmo.config import ModelConfig
from megaolmo.errors import CheckpointError
from megaolmo.model import OLMo, build_model

__all__ = [
    "CheckpointError",
    "load",
    "load_consolidated",
    "load_sharded",
    "load_state_dict",
    "restore_sharded",
    "save_consolidated",
    "save_sharded",
]


def load_state_dict(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Model config and unsharded state_dict of a consolidated or a sharded (training) checkpoint."""
    if (Path(path) / STATE_FILE).is_file():
        return load_sharded(Path(path))
    return load_consolidated(path)


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> OLMo:
    """The model of a megaolmo checkpoint (consolidated, or sharded at any layout), in eval mode, on `device`.

    Parameters keep the checkpoint's dtype unless `dtype` is given.
    """
    config, state = load_state_dict(path)
    model = build_model(config, device="meta")
    model.load_state_dict(state, assign=True)
    model.to(device=device, dtype=dtype)
    return model.eval()
