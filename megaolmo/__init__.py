"""megaolmo: Megatron-style 3D-parallel training of OLMo language models.

>>> import megaolmo
>>> model = megaolmo.load("path/to/checkpoint")      # eval mode, on CPU
>>> logits = model(input_ids)                         # [batch, seq] -> [batch, seq, padded vocab]

The names below load on first use, so that `import megaolmo.kernels` (and the model alone) needs nothing
but torch and triton, as on a GPU node that has nothing else installed.
"""

import importlib

_EXPORTS = {
    "ConfigError": "megaolmo.errors",
    "MegaolmoError": "megaolmo.errors",
    "ModelConfig": "megaolmo.config",
    "OLMo": "megaolmo.model",
    "build_model": "megaolmo.model",
    "load": "megaolmo.checkpoint",
}
__all__ = ["ConfigError", "MegaolmoError", "ModelConfig", "OLMo", "build_model", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megaolmo' has no attribute {name!r}")
