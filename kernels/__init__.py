"""RoPE, SwiGLU, parameter-free LayerNorm and RMSNorm: fused Triton kernels and their pure-torch twins.

Public API, each differentiable and each with the semantics of `reference`:

- `layer_norm(x, eps=1e-5)`: LayerNorm over the last dim, no weight or bias, fp32 statistics.
- `rms_norm(x, weight, eps=1e-6)`: OLMo-2's RMSNorm with a learned weight, fp32 statistics, x's dtype out.
- `swiglu(x)`: `silu(gate) * up` for x = [..., 2F] laid out as OLMo's [up | gate].
- `apply_rope(q, k, cos, sin)`: rotate_half RoPE of q and k in fp32, one launch.

The Triton versions are imported on first use, so megaolmo imports (and runs
with `kernels=torch`) where Triton is not installed. On CPU they run only under
`TRITON_INTERPRET=1`, set before triton is imported. Each is a torch custom op
(`torch.ops.megaolmo.*`, forward and backward, with a fake implementation for
shapes), so `model.compile` captures a block whole around them and calls the
kernels as they are: no compiler traces into a kernel that Triton's interpreter
runs, and on CUDA they are already fused.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType
from typing import Any

import torch

from megaolmo.kernels import reference
from megaolmo.kernels.reference import rope_cos_sin

BACKENDS = ("auto", "torch", "triton")
_PUBLIC = ("layer_norm", "rms_norm", "swiglu", "apply_rope")


@functools.cache
def triton_available() -> bool:
    """Probed once: `get` is called on every norm, RoPE and SwiGLU of every step."""
    return importlib.util.find_spec("triton") is not None


def resolve(backend: str, device: torch.device) -> str:
    """The implementation that runs for `model.kernels=backend` on `device`: auto is triton on CUDA."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"kernels={backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def get(backend: str, device: torch.device) -> ModuleType:
    """The module holding the ops of `_PUBLIC` (the norms, SwiGLU, RoPE) for `model.kernels=backend` on `device`."""
    if resolve(backend, device) == "torch":
        return reference
    if not triton_available():
        raise RuntimeError("kernels=triton needs Triton: pip install triton, or set model.kernels=torch")
    from megaolmo.kernels import fused  # an import statement, which torch.compile traces (import_module it skips)

    return fused


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(get("triton", torch.device("cuda")), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "apply_rope",
    "get",
    "layer_norm",
    "reference",
    "resolve",
    "rms_norm",
    "rope_cos_sin",
    "swiglu",
]
