"""A batch of instances: token ids, and what the data says about which of their targets a loss counts.

OLMo's conventions: `label_mask[r, t]` is True where token t of row r is a training target (the loss on
predicting it counts), and `instance_mask[r]` is False for an instance a filter dropped, which keeps its
place in the batch with every target masked out. `source[r]` names the source (by index) a row was read
from, for tokens-per-source metrics. Fields the data does not have are None: every target counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megaolmo.data.labels import IGNORE_INDEX, shifted_labels


@dataclass(frozen=True)
class Batch:
    """Rows of instances [b, s] with their masks; `labels()` are the next-token targets the loss takes."""

    input_ids: torch.Tensor  # [b, s] int64
    label_mask: torch.Tensor | None = None  # [b, s] bool: True where token t is a target
    instance_mask: torch.Tensor | None = None  # [b] bool: False for an instance whose targets are all masked
    source: torch.Tensor | None = None  # [b] int64: index of the source each row came from

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def labels(self) -> torch.Tensor:
        """Next-token targets [b, s], IGNORE_INDEX where the data masks them (and at the last position)."""
        labels = shifted_labels(self.input_ids)
        if self.label_mask is not None:
            labels[:, :-1].masked_fill_(~self.label_mask[:, 1:], IGNORE_INDEX)
        if self.instance_mask is not None:
            labels.masked_fill_(~self.instance_mask[:, None], IGNORE_INDEX)
        return labels

    def rows(self, rows: slice) -> Batch:
        """The batch of rows `rows` (a data-parallel rank's share)."""

        def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[rows]

        return Batch(take(self.input_ids), take(self.label_mask), take(self.instance_mask), take(self.source))
