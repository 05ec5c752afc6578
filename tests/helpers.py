"""Set-up the tests share: a small OLMo config to vary, and the check that a command succeeded."""

from __future__ import annotations

import subprocess

from megaolmo.config import ModelConfig, ParallelConfig, resolve_layout

# The shapes most tests start from: every dimension divides by TP 2 and 4, and the model runs in milliseconds.
SMALL_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "ffn_hidden_size": 96, "vocab_size": 256}


def small_model(**overrides) -> ModelConfig:
    """A small OLMo-1 config (SMALL_MODEL) with `overrides`."""
    return ModelConfig(**{**SMALL_MODEL, **overrides})


def resolved_model(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> ModelConfig:
    """The model config as megaolmo runs it on this layout (embedding padded for TP)."""
    return resolve_layout(model, parallel, world_size).model


def assert_ok(result: subprocess.CompletedProcess, tail: int = 3000) -> None:
    """The command exited 0; otherwise fail with the end of what it wrote to stderr."""
    assert result.returncode == 0, result.stderr[-tail:]
