"""RoPE's cos/sin tables: OLMo's default frequencies, or YaRN's for a context extended past training.

YaRN (Peng et al., 2023) keeps the high frequencies (many rotations over the original context),
interpolates the low ones by `factor`, ramps linearly between the two, and scales cos and sin by an
attention factor (0.1 ln(factor) + 1 unless given). The numbers follow Hugging Face's
`_compute_yarn_parameters` (with `truncate`), which is what OLMo-3's released configs are read with,
so a converted OLMo-3 rotates exactly as transformers does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from megaolmo.config import ModelConfig


@dataclass(frozen=True)
class Yarn:
    """YaRN's parameters (hashable, so the tables they give are cached)."""

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None

    @property
    def scale(self) -> float:
        """The factor cos and sin are multiplied by."""
        if self.attention_factor is not None:
            return self.attention_factor
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0


def _wavenumbers(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(2i/d) for the head_dim/2 rotated pairs, in fp32."""
    return theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def default_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/d), in fp32 (OLMo's and transformers' default RoPE)."""
    return 1.0 / _wavenumbers(head_dim, theta)


def yarn_inverse_frequencies(head_dim: int, theta: float, yarn: Yarn) -> torch.Tensor:
    """The blend of extrapolated (kept) and interpolated (divided by `factor`) frequencies YaRN rotates by."""

    def correction_dim(rotations: float) -> float:
        # The pair index whose wavelength fits `rotations` times into the original context.
        return head_dim * math.log(yarn.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    wavenumbers = _wavenumbers(head_dim, theta)
    kept, interpolated = 1.0 / wavenumbers, 1.0 / (yarn.factor * wavenumbers)  # rounded as transformers does
    extrapolation = 1 - ramp
    return interpolated * (1 - extrapolation) + kept * extrapolation


def yarn_of(config: ModelConfig) -> Yarn | None:
    """The model's YaRN parameters, or None without RoPE scaling."""
    if config.rope_scaling is None:
        return None
    return Yarn(
        factor=config.rope_scaling_factor,
        original_max_position=config.rope_original_max_position,
        beta_fast=config.yarn_beta_fast,
        beta_slow=config.yarn_beta_slow,
        attention_factor=config.yarn_attention_factor,
    )


@functools.lru_cache(maxsize=16)
def rope_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device, yarn: Yarn | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin [seq_len, head_dim // 2] for positions 0..seq_len-1, computed once and shared by blocks."""
    if yarn is None:
        inverse, scale = default_inverse_frequencies(head_dim, theta), 1.0
    else:
        inverse, scale = yarn_inverse_frequencies(head_dim, theta, yarn), yarn.scale
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inverse).to(device)
    if scale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scale, angles.sin() * scale
