"""megaolmo's checkpoints: two formats on disk, and one `load` that reads either.

consolidated.py        the whole model in one safetensors file (final weights, conversions, evaluation)
sharded.py             training checkpoints: each rank writes its share of the model, AdamW state and
                       data position with torch.distributed.checkpoint; any layout resumes any other
safetensors_stream.py  safetensors files written and read one tensor at a time
shares.py, dcp_io.py   where each rank's share of a tensor lies, and DCP writing and reading just that
directory.py           a run's checkpoints: names, `latest`, retention, the resume point

    save_consolidated(path, config, state)            load_consolidated(path) -> (config, state)
    write_consolidated(path, config, specs, read)     ConsolidatedTensors(path): .config .specs .read(name)
    save_sharded(dir, step, model=, optimizer=, ...)  restore_sharded(path, model, optimizer) -> state
                                                      load_sharded(path) -> (config, state), one process
                                                      ShardedTensors(path): .config .specs .read(name)
    open_tensors(path) -> Tensors                     either format, checked on open, a tensor at a time
    load_state_dict(path) -> (config, state)          either format, whole
    load(path) -> OLMo                                either format, in eval mode (`megaolmo.load`)

Conversions stream: `write_consolidated(dst, t.config, t.specs, t.read)` with `t = open_tensors(src)`
holds one tensor at a time, whatever the size of the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megaolmo.checkpoint.consolidated import (
    ConsolidatedTensors,
    load_consolidated,
    save_consolidated,
    write_consolidated,
)
from megaolmo.checkpoint.sharded import STATE_FILE, ShardedTensors, load_sharded, restore_sharded, save_sharded
from megaolmo.config import ModelConfig
from megaolmo.errors import CheckpointError
from megaolmo.model import OLMo, build_model

__all__ = [
    "CheckpointError",
    "ConsolidatedTensors",
    "ShardedTensors",
    "Tensors",
    "load",
    "load_consolidated",
    "load_sharded",
    "load_state_dict",
    "open_tensors",
    "restore_sharded",
    "save_consolidated",
    "save_sharded",
    "write_consolidated",
]

Tensors = ConsolidatedTensors | ShardedTensors


def open_tensors(path: str | Path) -> Tensors:
    """The tensors of a consolidated or a sharded (training) checkpoint, checked against its model config
    on open and read one at a time (`.config`, `.specs`, `.read(name)`)."""
    path = Path(path)
    return ShardedTensors(path) if (path / STATE_FILE).is_file() else ConsolidatedTensors(path)


def load_state_dict(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Model config and unsharded state_dict of a consolidated or a sharded (training) checkpoint."""
    tensors = open_tensors(path)
    return tensors.config, {name: tensors.read(name) for name in tensors.specs}


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> OLMo:
    """The model of a megaolmo checkpoint (consolidated, or sharded at any layout), in eval mode, on `device`.

    Parameters keep the checkpoint's dtype unless `dtype` is given.
    """
    config, state = load_state_dict(path)
    model = build_model(config, device="meta")
    model.load_state_dict(state, assign=True)
    model.to(device=device, dtype=dtype)
    return model.eval()
