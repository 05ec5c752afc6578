"""Training targets: the next token at every position, and the label that marks a position as not scored."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # a label that no loss counts (torch's cross-entropy default)


def shifted_labels(batch: torch.Tensor) -> torch.Tensor:
    """Next-token targets for every position of [b, s] token ids; the last position has none."""
    return torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], IGNORE_INDEX)], dim=1)
