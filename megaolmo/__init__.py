"""megaolmo: Megatron-style 3D-parallel training of OLMo language models.

>>> import megaolmo
>>> model = megaolmo.load("path/to/checkpoint")      # eval mode, on CPU
>>> logits = model(input_ids)                         # [batch, seq] -> [batch, seq, padded vocab]
"""

from megaolmo.checkpoint import load
from megaolmo.config import ModelConfig
from megaolmo.errors import ConfigError, MegaolmoError
from megaolmo.model import OLMo, build_model

__all__ = ["ConfigError", "MegaolmoError", "ModelConfig", "OLMo", "build_model", "load"]
__version__ = "0.1.0"
