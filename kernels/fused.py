"""The Triton implementation of the four ops (`model.kernels=triton`)."""

from megaolmo.kernels.layer_norm_triton import layer_norm
from megaolmo.kernels.rms_norm_triton import rms_norm
from megaolmo.kernels.rope_triton import apply_rope
from megaolmo.kernels.swiglu_triton import swiglu

__all__ = ["apply_rope", "layer_norm", "rms_norm", "swiglu"]
