"""Shared test set-up: GPU-only tests are marked `gpu` and skipped where CUDA is absent.

Without CUDA, Triton kernels run through Triton's interpreter, which must be
switched on before anything imports triton (transformers does).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on CPU-only machines")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small Dolma corpus prepared once for every test that trains (see training_run.py)."""
    from training_run import prepare_dataset

    return prepare_dataset(tmp_path_factory.mktemp("dolma"))
