"""What a training run reads: its training memmaps and its held-out groups, checked up front.

`data.paths` names prepared memmaps (with `data.valid_paths` and `data.tokenizer`); `data.sources`
instead names several sources, each with its memmaps and its share of the run (megaolmo.data.mixture);
with neither the run trains on the built-in corpus, prepared on first use. Whichever it is, every file
is checked against the tokenizer and the model's vocabulary before the first step. The held-out data
(`data.valid_paths`, or the built-in corpus's held-out split) is split by group, a source or
`source/domain` (megaolmo.data.held_out), each scored on its own by the in-loop evaluation.
"""

from __future__ import annotations

from pathlib import Path

from megaolmo.config import DataConfig
from megaolmo.config.schema import DataSourceConfig
from megaolmo.data.corpus import builtin_corpus
from megaolmo.data.dataset import MemmapDataset, check_compatible
from megaolmo.data.held_out import HeldOutGroup, held_out_groups
from megaolmo.data.mixture import MixtureDataset, check_sources
from megaolmo.errors import ConfigError, DataError


class DataSources:
    """Training memmaps (one dataset, or a mixture of sources) and held-out groups, checked against the
    model's tokenizer and vocab."""

    def __init__(
        self, data: DataConfig, *, seq_len: int, vocab_size: int, progress: bool, instances: int, seed: int
    ) -> None:
        """`instances` (trainer.max_steps x trainer.global_batch_size) and `seed` fix a mixture's shares and
        samples; `progress` shows the built-in corpus's preparation and prints the mixture."""
        if data.sources:
            _check_mixture_config(data)
        if data.paths or data.sources:
            train, valid = [Path(p) for p in data.paths], [Path(p) for p in data.valid_paths]
            tokenizer = Path(data.tokenizer) if data.tokenizer is not None else None
        else:
            cache = Path(data.cache_dir) if data.cache_dir else None
            corpus = builtin_corpus(cache, data.builtin_vocab_size, progress=progress)
            train, valid, tokenizer = corpus.train_paths, corpus.valid_paths, corpus.tokenizer_path
        for paths in (train, valid):
            if paths:
                check_compatible(paths, tokenizer, vocab_size)
        self.tokenizer: Path | None = tokenizer  # the tokenizer the data was made with, when known
        self.train: MemmapDataset | MixtureDataset
        if data.sources:
            datasets = [_source_dataset(source, data, seq_len, vocab_size, tokenizer) for source in data.sources]
            self.train = MixtureDataset(data.sources, datasets, instances=instances, seed=seed)
            if progress:
                print(self.train.describe())
        else:
            self.train = MemmapDataset(train, seq_len, data.dtype)
        self.valid: dict[str, HeldOutGroup] = held_out_groups(valid, seq_len, dtype=data.dtype, tokenizer=tokenizer)


def _check_mixture_config(data: DataConfig) -> None:
    """What data.sources cannot be combined with, then the mixture's own checks, each in one line."""
    if data.paths:
        raise ConfigError(
            "data.paths and data.sources are both set; train on data.paths (one source) or on data.sources "
            "(a mixture), e.g. data.paths=[]"
        )
    if data.label_mask_paths:
        raise ConfigError(
            "data.label_mask_paths pairs masks with data.paths' token files; a mixture (data.sources) takes none "
            "(as in OLMo-core)"
        )
    check_sources(data.sources)


def _source_dataset(
    source: DataSourceConfig, data: DataConfig, seq_len: int, vocab_size: int, tokenizer: Path | None
) -> MemmapDataset:
    """One source's instances, its files checked as data.paths' are; an error names the source."""
    try:
        paths = [Path(p) for p in source.paths]
        check_compatible(paths, tokenizer, vocab_size)
        return MemmapDataset(paths, seq_len, data.dtype)
    except DataError as err:
        raise DataError(f"data.sources[{source.name}]: {err}") from None
