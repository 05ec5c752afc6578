"""Source mixtures (`data.sources`): a run's instances drawn from several sources in set proportions.

OLMo-core's SourceMixtureDataset, in whole instances. A run reads N = trainer.max_steps x
trainer.global_batch_size instances; source s gives n_s of them, target_ratio_s x N rounded by the
largest remainder, so the n_s sum to exactly N and each is within one instance of its target. A source
with A_s < n_s instances is repeated: n_s // A_s whole passes over it, then a sample of the other
n_s % A_s; a source with more gives a sample of n_s. One that would need more than max_repetition x A_s
is refused at start-up, in one line naming it and the tokens it lacks.

The sample. OLMo-core takes a prefix of every file for the fractional pass; here it is a sample of the
source's instances, because a file's first tokens are not a fair share of it (a prepared file keeps its
inputs' order: a crawl, a date, a quality bucket). It is the first k positions of a keyed pseudo-random
permutation of the source's instances, a Feistel network walked back into range (cycle walking), its
round keys drawn from PCG64 seeded with (seed, the source's name). It is computed per index, so no rank
materializes a sample (at Dolma's scale that would be gigabytes per rank), and a larger sample of a
source holds every smaller one.

The layout. Mixture instance i lies in its source's block [start_s, start_s + n_s), the sources in
config order; offset j of a block is instance j % A_s within the whole passes, else sample position
j - passes x A_s. A rank holds O(sources) numbers. GlobalBatches' order (PCG64 over the N mixture
instances) mixes the blocks, so the mixture, like every batch, is fixed by the seed, is the same on
every TP x PP x DP layout and resumes exactly from GlobalBatches' state in samples.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from megaolmo.config.schema import DataSourceConfig
from megaolmo.data.batch import Batch
from megaolmo.data.dataset import GlobalBatches, MemmapDataset
from megaolmo.errors import ConfigError, DataError
from megaolmo.tables import format_table

RATIO_TOLERANCE = 1e-6  # how far from 1 the target ratios may sum
FEISTEL_ROUNDS = 6  # 4 rounds of a pseudo-random function already give a pseudo-random permutation (Luby-Rackoff)


def check_sources(sources: Sequence[DataSourceConfig]) -> None:
    """Refuse, in one line and before any file is opened, what no data can fix: no sources, a name used
    twice, target ratios that do not sum to 1."""
    if not sources:
        raise ConfigError("data.sources is empty; list at least one source, or train on data.paths")
    names: set[str] = set()
    for source in sources:
        if source.name in names:
            raise ConfigError(f"data.sources: two sources are named {source.name}; give each its own name")
        names.add(source.name)
    total = sum(source.target_ratio for source in sources)
    if abs(total - 1.0) > RATIO_TOLERANCE:
        terms = " + ".join(f"{source.name} {source.target_ratio:g}" for source in sources)
        raise ConfigError(
            f"data.sources: the target_ratio values sum to {total:.7g} ({terms}), not 1; make them sum to 1"
        )


def mixture_counts(ratios: Sequence[float], instances: int) -> list[int]:
    """Instances per source: ratio x `instances` (the ratios scaled to sum to exactly 1) rounded by the
    largest remainder, so the counts sum to `instances` and each is within one instance of its target.

    Exact rational arithmetic, so no float error moves an instance; ties go to the earlier source.
    """
    exact = [Fraction(ratio) for ratio in ratios]
    total = sum(exact)
    targets = [ratio / total * instances for ratio in exact]
    counts = [math.floor(target) for target in targets]
    by_remainder = sorted(range(len(targets)), key=lambda s: counts[s] - targets[s])  # stable: ties in order
    for s in by_remainder[: instances - sum(counts)]:
        counts[s] += 1
    return counts


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64s (wrapping): a bijective mixer, each input bit flips about half the output."""
    z = (z ^ (z >> 30)) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> 27)) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> 31)


class KeyedPermutation:
    """A pseudo-random permutation of [0, n) evaluated per index, with no table: a balanced Feistel network
    on 2h-bit integers (the smallest h with 4^h >= n), re-applied to a value outside [0, n) until it falls
    inside (cycle walking: 4^h < 4n, so under 4 passes of the network on average), a bijection of [0, n)."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = rng.integers(0, 2**64, size=FEISTEL_ROUNDS, dtype=np.uint64)

    def _network(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The images of `positions` (int64, each in [0, n)) as int64."""
        out = self._network(np.asarray(positions, dtype=np.int64).reshape(-1).astype(np.uint64))
        outside = out >= self.n
        while outside.any():
            out[outside] = self._network(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)


def sample_permutation(n: int, seed: int, name: str) -> KeyedPermutation:
    """Source `name`'s sample order over its n instances: keys from PCG64 seeded with (seed, crc32 of the
    name), so a source's sample depends on the run's seed, its name and its size, not on the other sources."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))
    return KeyedPermutation(n, rng)


@dataclass(frozen=True)
class _Share:
    """What one source gives the mixture: `count` instances, `passes` whole passes over its `available`
    instances, then the first `count - passes x available` positions of `sample`."""

    count: int
    available: int
    passes: int
    sample: KeyedPermutation | None

    @property
    def sampled(self) -> int:
        return self.count - self.passes * self.available


def _shortfall(source: DataSourceConfig, count: int, available: int, instances: int, seq_len: int) -> str:
    """The one line refusing a source that cannot give `count` instances within its max_repetition."""
    usable = math.floor(source.max_repetition * available)
    lacking = (count - usable) * seq_len
    raise_it = f"raise its max_repetition to {math.ceil(100 * count / available) / 100:g}, " if available else ""
    return (
        f"data.sources[{source.name}]: target_ratio {source.target_ratio:g} of the run's {instances:,} instances "
        f"of {seq_len} tokens needs {count:,} from it, but it has {available:,} (x max_repetition "
        f"{source.max_repetition:g} = {usable:,}) and lacks {lacking:,} tokens; add data, {raise_it}"
        "lower its target_ratio or train fewer steps"
    )


class MixtureDataset:
    """The run's instances from several sources in their target ratios, with MemmapDataset's interface
    (`len`, `seq_len`, `get_batch`, `paths`), so GlobalBatches orders it as one dataset.
    A batch's `source` holds each row's source, an index into `names`."""

    def __init__(
        self, sources: Sequence[DataSourceConfig], datasets: Sequence[MemmapDataset], *, instances: int, seed: int
    ) -> None:
        """`datasets[s]` holds the instances of `sources[s]` (all of one seq_len); `instances` is what the run reads."""
        check_sources(sources)
        if instances < 1:
            raise DataError(f"a mixture of {instances} instances is empty; train at least one step")
        self.names = [source.name for source in sources]
        self.target_ratios = [source.target_ratio for source in sources]
        self.datasets = list(datasets)
        self.seq_len = self.datasets[0].seq_len
        self.seed = seed
        counts = mixture_counts(self.target_ratios, instances)
        self._shares: list[_Share] = []
        for source, dataset, count in zip(sources, self.datasets, counts, strict=True):
            available = len(dataset)
            if count > source.max_repetition * available:
                raise DataError(_shortfall(source, count, available, instances, self.seq_len))
            passes = count // available if available else 0
            sampled = count - passes * available
            sample = sample_permutation(available, seed, source.name) if sampled else None
            self._shares.append(_Share(count, available, passes, sample))
        self.counts = counts
        self._starts = np.cumsum([0, *counts], dtype=np.int64)
        self.paths = [path for dataset in self.datasets for path in dataset.paths]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def source_of(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """The source (an index into `names`) of each mixture instance in `indices`; no token is read."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"instances {indices.min()}..{indices.max()} out of range for a mixture of {len(self)}")
        return (np.searchsorted(self._starts, indices, side="right") - 1).astype(np.int64)

    def locate(self, indices: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(source, instance of that source's dataset) of each mixture instance in `indices`."""
        source = self.source_of(indices)
        instance = np.asarray(indices, dtype=np.int64).reshape(-1) - self._starts[source]
        for s in np.unique(source):
            rows = np.flatnonzero(source == s)
            share, offset = self._shares[s], instance[rows]
            whole = share.passes * share.available
            repeated = offset < whole
            offset[repeated] %= share.available
            if not repeated.all():
                offset[~repeated] = share.sample(offset[~repeated] - whole)
            instance[rows] = offset
        return source, instance

    def get_batch(self, indices: np.ndarray | Sequence[int]) -> Batch:
        """Instances `indices` (at least one) as a Batch: each row read from its source, with that source's
        masks, and `source` naming it."""
        source, instance = self.locate(indices)
        input_ids = torch.empty((len(source), self.seq_len), dtype=torch.int64)
        label_mask = None
        for s in np.unique(source):
            rows = torch.from_numpy(np.flatnonzero(source == s))  # read straight into their places
            part = self.datasets[s].get_batch(instance[rows.numpy()])
            input_ids[rows] = part.input_ids
            if part.label_mask is not None:
                if label_mask is None:
                    label_mask = torch.ones(input_ids.shape, dtype=torch.bool)
                label_mask[rows] = part.label_mask
        return Batch(input_ids, label_mask=label_mask, source=torch.from_numpy(source))

    def describe(self) -> str:
        """The mixture, one row per source: what rank 0 prints at start-up."""
        rows = []
        for name, ratio, share in zip(self.names, self.target_ratios, self._shares):
            passes = f"{share.count / share.available:.3f}" if share.available else "-"
            rows.append({
                "source": name, "target": f"{ratio:.4%}", "share": f"{share.count / len(self):.4%}",
                "instances": f"{share.count:,}", "available": f"{share.available:,}", "passes": passes,
                "read as": f"{share.passes} whole + {share.sampled:,} sampled",
            })  # fmt: skip
        title = f"data mixture: {len(self):,} instances of {self.seq_len} tokens (seed {self.seed})"
        return title + "\n" + format_table(rows)


def _tokens(rows: Sequence[int], names: Sequence[str], seq_len: int) -> dict[str, int]:
    return {name: int(count) * seq_len for name, count in zip(names, rows, strict=True)}


class TokensSeen:
    """Tokens of each source trained on in global steps [0, steps) of `batches` (over a MixtureDataset),
    counted from the data order rather than from a rank's batch (its data-parallel share only): no token
    read, no collective, and exact after a resume, whose first call counts the earlier steps (once)."""

    def __init__(self, batches: GlobalBatches) -> None:
        if not isinstance(batches.dataset, MixtureDataset):
            raise DataError("tokens per source need a mixture (data.sources); these batches are of one dataset")
        self.batches, self.mixture = batches, batches.dataset
        self.steps, self.rows = 0, np.zeros(len(self.mixture.names), dtype=np.int64)

    def __call__(self, steps: int) -> dict[str, int]:
        """Per source name, the tokens of global steps [0, steps); `steps` never decreases between calls."""
        for step in range(self.steps, steps):
            sources = self.mixture.source_of(self.batches.indices(step))
            self.rows += np.bincount(sources, minlength=len(self.rows))
        self.steps = max(self.steps, steps)
        return _tokens(self.rows.tolist(), self.mixture.names, self.mixture.seq_len)
