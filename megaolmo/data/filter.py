"""OLMo's instance filter: drop an instance in which a short pattern of tokens repeats many times in a row.

OLMo (`MemMapDataset._validate_instance`, `InstanceFilterConfig`) runs `find_periodic_sequences` on each
instance and drops it when some period p in [min_period, max_period] repeats at least `max_count` times.
That search reshapes the instance into rows of p tokens, takes the blocks of rows equal to the row before
and widens each block by the matching tokens at its two ends. Worked through, a block it reports is a
maximal run of positions i with tokens[i] == tokens[i - p]; a run of length n reports n // p + 1 repeats
(the period itself, then every whole period equal to the one before), and only runs of at least 3 repeats
are reported. Periods beyond a third of the instance are not searched, which never matters here: a run of
3 or more repeats of p needs 3p tokens. So an instance is dropped exactly when, for some searched p, the
equalities tokens[i] == tokens[i - p] hold at (max(max_count, 3) - 1) * p consecutive positions.

That form vectorizes: per period, one comparison of the batch with itself shifted by p, then windows of
consecutive equalities by doubling (window w from i and window w from i + w make window 2w from i; two
overlapping windows of w make any length up to 2w), about 9 boolean ANDs of the batch for OLMo's longest
window, 31 x 13. A dropped instance keeps its place in the batch with all its targets masked out
(`Batch.instance_mask`), so the decision is a function of the instance's tokens alone: the same on every
layout and on resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megaolmo.config.schema import InstanceFilterConfig

MIN_REPORTED_REPEATS = 3  # find_periodic_sequences reports no run of fewer repeats (it cannot place them)


@dataclass(frozen=True)
class RepetitionFilter:
    """Keeps the instances without `max_count` back-to-back repeats of any period in [min_period, max_period]
    (periods >= 1, as InstanceFilterConfig checks)."""

    min_period: int
    max_period: int
    max_count: int

    @classmethod
    def from_config(cls, config: InstanceFilterConfig) -> RepetitionFilter | None:
        """The filter `data.instance_filter` asks for, or None when it is off."""
        if not config.enabled:
            return None
        return cls(config.repetition_min_period, config.repetition_max_period, config.repetition_max_count)

    def keep(self, instances: np.ndarray) -> np.ndarray:
        """[b] bool, False for each row of `instances` [b, seq_len] that the filter drops."""
        instances = np.asarray(instances)
        n_rows, seq_len = instances.shape
        dropped = np.zeros(n_rows, dtype=bool)
        repeats = max(self.max_count, MIN_REPORTED_REPEATS)
        for period in range(self.min_period, min(self.max_period, seq_len // 3) + 1):
            window = (repeats - 1) * period  # consecutive equalities with the token p before
            if window > seq_len - period:
                break  # longer periods need even longer windows
            run = instances[:, period:] == instances[:, :-period]  # run[:, i]: the `width` equalities from i hold
            width = 1
            while 2 * width <= window:
                run = run[:, :-width] & run[:, width:]
                width *= 2
            if width < window:
                run = run[:, : run.shape[1] - (window - width)] & run[:, window - width :]
            dropped |= run.any(axis=1)
        return ~dropped
