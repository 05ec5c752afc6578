"""The consolidated checkpoint: one directory holding the whole model, unsharded, which
`megaolmo.load`, the evaluators and `python -m megaolmo.convert to-hf` read:

    config.json        {"format": "megaolmo-consolidated", "format_version": 1, "model": {ModelConfig}}
    model.safetensors  the model's state_dict, unsharded, in the dtype it was saved in

A directory is only ever written under a temporary name and renamed into place
once complete, so a crash never leaves something that looks like a checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megaolmo.atomic import atomic_directory
from megaolmo.config import ModelConfig
from megaolmo.errors import CheckpointError, ConfigError
from megaolmo.model import build_model

CONSOLIDATED_FORMAT = "megaolmo-consolidated"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the state_dict of an unsharded model of this config."""
    model = build_model(config, device="meta")
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_tensors(
    expected: Mapping[str, tuple[int, ...]],
    tensors: Mapping[str, torch.Tensor],
    source: str,
    ignore: Callable[[str], bool] = lambda name: False,
) -> None:
    """Raise one CheckpointError line for the first missing, misshapen or unexpected tensor."""
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor {name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)} but the model config implies {shape}"
            )
    unexpected = sorted(name for name in set(tensors) - set(expected) if not ignore(name))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {unexpected[:5]} do not belong to this model config")


def check_state_dict(config: ModelConfig, state: Mapping[str, torch.Tensor], source: str) -> None:
    """A megaolmo state_dict must hold exactly the tensors of an unsharded model of `config`."""
    check_tensors(expected_shapes(config), state, source)


def write_atomically(path: Path, write, overwrite: bool = False) -> None:
    """Call `write(tmp_dir)` and rename tmp_dir to `path`; on any failure nothing is left behind."""
    with atomic_directory(path, CheckpointError, overwrite) as tmp:
        write(tmp)


def save_consolidated(
    path: str | Path, config: ModelConfig, state: Mapping[str, torch.Tensor], overwrite: bool = False
) -> None:
    """Write a consolidated checkpoint of an unsharded state_dict (validated against `config` first)."""
    check_state_dict(config, state, "state to save")
    header = {"format": CONSOLIDATED_FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}

    def write(tmp: Path) -> None:
        tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(header, indent=2) + "\n")

    write_atomically(Path(path), write, overwrite)


def read_config(path: str | Path) -> ModelConfig:
    """The model config of a megaolmo checkpoint directory, with a clear line for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a megaolmo checkpoint: {CONFIG_FILE} is missing")
    try:
        header = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON ({err})") from None
    if header.get("format") != CONSOLIDATED_FORMAT:
        hint = (
            "; it looks like a Hugging Face model: run python -m megaolmo.convert from-hf first"
            if "model_type" in header
            else ""
        )
        raise CheckpointError(f"{path} is not a megaolmo checkpoint (format={header.get('format')!r}){hint}")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version={header.get('format_version')!r}; this megaolmo reads {FORMAT_VERSION}"
        )
    try:
        return ModelConfig.from_dict(header["model"])
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{config_file}: {err}") from None


def load_consolidated(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Model config and unsharded state_dict (on CPU, in the saved dtype) of a checkpoint directory."""
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} is missing; the checkpoint is incomplete")
    state = load_file(str(weights), device="cpu")
    check_state_dict(config, state, str(weights))
    return config, state
