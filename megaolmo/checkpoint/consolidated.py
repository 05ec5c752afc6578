"""The consolidated checkpoint: one directory holding the whole model, unsharded, which
`megaolmo.load`, the evaluators and `python -m megaolmo.convert to-hf` read:

    config.json        {"format": "megaolmo-consolidated", "format_version": 1, "model": {ModelConfig}}
    model.safetensors  the model's state_dict, unsharded, in the dtype it was saved in

A directory is only ever written under a temporary name and renamed into place
once complete, so a crash never leaves something that looks like a checkpoint.
Both directions go a tensor at a time (`write_consolidated`, `ConsolidatedTensors`):
a 65B model is ~260 GB in fp32, more than a conversion host need hold.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from megaolmo.atomic import atomic_directory
from megaolmo.checkpoint.safetensors_stream import SafetensorsReader, Specs, save_file_order, write_safetensors
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


def check_shapes(
    expected: Mapping[str, tuple[int, ...]],
    shapes: Mapping[str, tuple[int, ...]],
    source: str,
    ignore: Callable[[str], bool] = lambda name: False,
) -> None:
    """Raise one CheckpointError line for the first missing, misshapen or unexpected tensor."""
    for name, shape in expected.items():
        if name not in shapes:
            raise CheckpointError(f"{source}: tensor {name} is missing")
        if tuple(shapes[name]) != shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(shapes[name])} but the model config implies {shape}"
            )
    unexpected = sorted(name for name in set(shapes) - set(expected) if not ignore(name))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {unexpected[:5]} do not belong to this model config")


def check_tensors(
    expected: Mapping[str, tuple[int, ...]],
    tensors: Mapping[str, torch.Tensor],
    source: str,
    ignore: Callable[[str], bool] = lambda name: False,
) -> None:
    """`check_shapes` of tensors in memory."""
    check_shapes(expected, {name: tuple(t.shape) for name, t in tensors.items()}, source, ignore)


def check_specs(config: ModelConfig, specs: Specs, source: str) -> None:
    """A megaolmo checkpoint must hold exactly the tensors of an unsharded model of `config`."""
    check_shapes(expected_shapes(config), {name: shape for name, (shape, _) in specs.items()}, source)


def write_atomically(path: Path, write, overwrite: bool = False) -> None:
    """Call `write(tmp_dir)` and rename tmp_dir to `path`; on any failure nothing is left behind."""
    with atomic_directory(path, CheckpointError, overwrite) as tmp:
        write(tmp)


def write_consolidated(
    path: str | Path,
    config: ModelConfig,
    specs: Specs,
    read: Callable[[str], torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> None:
    """Write a consolidated checkpoint tensor by tensor, so that no more than one tensor need be in memory.

    `specs` (validated against `config` before anything is written) names the tensors; `read(name)` is
    called once for each, its tensor cast to `dtype` when given and dropped once written.
    """
    check_specs(config, specs, "tensors to save")
    layout = save_file_order({name: (shape, dtype or saved) for name, (shape, saved) in specs.items()})
    header = {"format": CONSOLIDATED_FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}

    def write(tmp: Path) -> None:
        write_safetensors(tmp / WEIGHTS_FILE, layout, lambda name: read(name).to(layout[name][1]))
        (tmp / CONFIG_FILE).write_text(json.dumps(header, indent=2) + "\n")

    write_atomically(Path(path), write, overwrite)


def save_consolidated(
    path: str | Path, config: ModelConfig, state: Mapping[str, torch.Tensor], overwrite: bool = False
) -> None:
    """Write a consolidated checkpoint of an unsharded state_dict (validated against `config` first)."""
    specs = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    write_consolidated(path, config, specs, state.__getitem__, overwrite=overwrite)


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


class ConsolidatedTensors:
    """The tensors of a consolidated checkpoint, validated on open and read one at a time.

    The interface of `ShardedTensors` (`config`, `specs`, `read`), so that a converter streams either format.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.config = read_config(path)
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{path}: {WEIGHTS_FILE} is missing; the checkpoint is incomplete")
        self._file = SafetensorsReader(weights)
        self.specs = self._file.specs
        check_specs(self.config, self.specs, str(weights))

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name`, whole, on CPU, in the saved dtype."""
        return self._file.read(name)


def load_consolidated(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Model config and unsharded state_dict (on CPU, in the saved dtype) of a checkpoint directory."""
    tensors = ConsolidatedTensors(path)
    return tensors.config, {name: tensors.read(name) for name in tensors.specs}
