"""Shared test set-up: GPU-only tests are marked `gpu` and skipped where CUDA is absent.

Without CUDA, Triton kernels run through Triton's interpreter, which must be
switched on before anything imports triton (transformers does), and FP8 is
emulated: on CPU `torch._scaled_mm` is a scalar reference path whose speed
varies by orders of magnitude between CPUs, so a test that reaches it fails
unless it is marked `real_scaled_mm` (and then keeps its shapes tiny).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on CPU-only machines")
    config.addinivalue_line("markers", "real_scaled_mm: may call torch._scaled_mm on CPU (tiny shapes only)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_scaled_mm_on_cpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU, torch._scaled_mm raises in every test not marked real_scaled_mm (in this process)."""
    if torch.cuda.is_available() or "real_scaled_mm" in request.keywords:
        return

    def refuse(*args, **kwargs):
        raise AssertionError("a CPU test called torch._scaled_mm (the slow reference path): FP8 should be emulated")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small Dolma corpus prepared once for every test that trains (see training_run.py)."""
    from training_run import prepare_dataset

    return prepare_dataset(tmp_path_factory.mktemp("dolma"))
