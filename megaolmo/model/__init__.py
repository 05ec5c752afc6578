"""OLMo written against megaolmo's parallel layers."""

from megaolmo.model.olmo import OLMo, OLMoBlock, build_model

__all__ = ["OLMo", "OLMoBlock", "build_model"]
