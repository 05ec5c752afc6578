"""What a training run reads: its training memmaps and one held-out memmap per source, checked up front.

`data.paths` names prepared memmaps (with `data.valid_paths` and `data.tokenizer`); without them the
run trains on the built-in corpus, prepared on first use. Either way every file is checked against the
tokenizer and the model's vocabulary before the first step.
"""

from __future__ import annotations

from pathlib import Path

from megaolmo.config import DataConfig
from megaolmo.data.corpus import builtin_corpus
from megaolmo.data.dataset import MemmapDataset, check_compatible


class DataSources:
    """Training memmaps and held-out memmaps per source, checked against the model's tokenizer and vocab."""

    def __init__(self, data: DataConfig, *, seq_len: int, vocab_size: int, progress: bool) -> None:
        if data.paths:
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
        self.train = MemmapDataset(train, seq_len, data.dtype)
        self.valid = {path.stem: MemmapDataset([path], seq_len, data.dtype) for path in valid}
