"""A run that starts from another checkpoint's weights (`trainer.init_from`), with a fresh optimizer and schedule.

The source is a sharded checkpoint (a training one, or a run's `final/`) or a consolidated one (what
`convert from-hf` and `from-olmo` write: a released OLMo, say). Each rank reads only its share, straight
into its parameters: from a sharded checkpoint through DCP, as a resume does; from a consolidated one as
rectangles of the memory-mapped safetensors file. The weights must have the run's shapes; fields that do
not change them (the context length, RoPE scaling, the kernels) may differ, and are reported, so that a
long-context stage can start from a short-context model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megaolmo.checkpoint.consolidated import WEIGHTS_FILE, expected_shapes, read_config
from megaolmo.checkpoint.safetensors_stream import SafetensorsReader
from megaolmo.checkpoint.sharded import RUNTIME_FIELDS, STATE_FILE, agree_on_failure, load_entries, model_entries
from megaolmo.checkpoint.shares import Share
from megaolmo.config import ModelConfig
from megaolmo.errors import CheckpointError


def _differences(saved: ModelConfig, config: ModelConfig, path: Path) -> list[str]:
    """The fields in which the run's model differs from the checkpoint's; refused where the shapes differ."""
    current, before = config.to_dict(), saved.to_dict()
    differing = [key for key in current if key not in RUNTIME_FIELDS and before[key] != current[key]]
    details = [f"{key}={before[key]!r} (now {current[key]!r})" for key in differing]
    if expected_shapes(saved) != expected_shapes(config) or saved.padded_vocab_size != config.padded_vocab_size:
        if saved.padded_vocab_size != config.padded_vocab_size:
            details.append(f"embedding rows {saved.padded_vocab_size} (now {config.padded_vocab_size})")
        raise CheckpointError(
            f"trainer.init_from={path} holds another model's weights: {', '.join(details)}; set the model config "
            "to the checkpoint's (e.g. its model preset, with model.embedding_size as saved)"
        )
    return details


def _read_consolidated(path: Path, entries: dict[str, Share], config: ModelConfig, device: torch.device) -> list[str]:
    """Fill this rank's shares from a consolidated checkpoint's safetensors file; one verdict for all ranks."""
    notes: list[str] = []
    error = None
    try:
        notes = _differences(read_config(path), config, path)
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{path}: {WEIGHTS_FILE} is missing; the checkpoint is incomplete")
        reader = SafetensorsReader(weights)
        for key, share in entries.items():
            name = key.removeprefix("model/")
            if name not in reader.specs or reader.specs[name][0] != share.shape:
                raise CheckpointError(
                    f"{weights}: tensor {name} is missing or misshapen (the model needs {share.shape})"
                )
            for piece in share.pieces:
                reader.read_rectangle(name, piece.offsets, piece.local)
    except (OSError, RuntimeError, ValueError, CheckpointError) as err:
        error = err
    reason = agree_on_failure(error, device)
    if reason is not None:
        raise CheckpointError(reason if isinstance(error, CheckpointError) else f"loading {path} failed ({reason})")
    return notes


@torch.no_grad()
def initialize_weights(path: str | Path, model) -> list[str]:
    """Load the weights of the checkpoint at `path` (any layout, either format) into this layout's model.

    Collective. Returns the model-config fields that differ from the checkpoint's (shapes aside).
    """
    path = Path(path)
    model.reshard()  # the fp32 shards, whatever a forward-only pass left gathered
    entries = model_entries(model, include_replica=True)
    if not (path / STATE_FILE).is_file():
        return _read_consolidated(path, entries, model.config, model.mesh.device)
    notes: list[str] = []

    def accept(state: dict) -> None:
        notes.extend(_differences(ModelConfig.from_dict(state["model"]), model.config, path))

    load_entries(path, entries, device=model.mesh.device, accept=accept)
    return notes
