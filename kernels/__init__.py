"""Implementations of RoPE, SwiGLU and parameter-free LayerNorm, chosen by `model.kernels`.

Every implementation offers the same three functions with the semantics of
`reference` (the pure-torch twin): `layer_norm(x, eps)`, `swiglu(x)` and
`apply_rope(q, k, cos, sin)`.
"""

from __future__ import annotations

from types import ModuleType

from megaolmo.kernels import reference
from megaolmo.kernels.reference import rope_cos_sin

IMPLEMENTATIONS: dict[str, ModuleType] = {"torch": reference}


def get(backend: str) -> ModuleType:
    """The module holding `layer_norm`, `swiglu` and `apply_rope` for a `model.kernels` value."""
    try:
        return IMPLEMENTATIONS[backend]
    except KeyError:
        raise ValueError(f"kernels={backend!r} is not one of {', '.join(IMPLEMENTATIONS)}") from None


__all__ = ["IMPLEMENTATIONS", "get", "reference", "rope_cos_sin"]
