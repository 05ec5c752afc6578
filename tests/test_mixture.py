"""Source mixtures (data.sources): shares, repetition, refusals, layout independence, resume, one training run.

Each source is a tiny prepared-looking directory (uint32 memmap + metadata.json) whose tokens say where they
come from: token t of source s is s * 1e6 + t, so a row's first token names its source and instance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from training_run import TINY, VOCAB, losses, train, write_dolma

from megaolmo.config import DataConfig
from megaolmo.config.schema import DataSourceConfig, InstanceFilterConfig
from megaolmo.data import DataSources, GlobalBatches, RepetitionFilter, prepare
from megaolmo.data.batch import Batch
from megaolmo.data.metadata import FORMAT, FORMAT_VERSION, METADATA_FILE
from megaolmo.data.mixture import MixtureDataset, TokensSeen, mixture_counts, sample_permutation
from megaolmo.errors import ConfigError, DataError
from megaolmo.plan.__main__ import compose_config

SEQ = 8  # tokens per instance
STRIDE = 1_000_000  # token ids of source s start at s * STRIDE
DATA_VOCAB = 100 * STRIDE


def tokens_per_source(batch: Batch, names: list[str]) -> dict[str, int]:
    """Tokens of `batch` per source, every one of `names` included: the rows it read, counted whole."""
    counts = torch.bincount(batch.source, minlength=len(names)).tolist()
    return {name: count * batch.input_ids.shape[1] for name, count in zip(names, counts, strict=True)}


def write_source(root: Path, name: str, index: int, instances: int, *, constant: bool = False) -> Path:
    """`root/name/`: `instances` instances of SEQ tokens (plus a 3-token tail that makes no instance) in two
    files, with the metadata.json that prepare writes (3 bytes of text per token)."""
    directory = root / name
    directory.mkdir(parents=True)
    tokens = index * STRIDE + np.arange(instances * SEQ + 3, dtype=np.uint32)
    if constant:  # one token repeated: the instance filter drops every instance
        tokens[:] = index * STRIDE
    half = (instances // 2) * SEQ
    files = {"part-0.npy": tokens[:half], "part-1.npy": tokens[half:]}
    for file, part in files.items():
        part.tofile(directory / file)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": "uint32", "vocab_size": DATA_VOCAB,
                "tokenizer_fingerprint": "test",
                "files": {file: {"tokens": len(part), "bytes": 3 * len(part)} for file, part in files.items()}}  # fmt: skip
    (directory / METADATA_FILE).write_text(json.dumps(metadata))
    return directory


def build(
    root: Path, sources: list[tuple[str, int, float, float]], *, instances: int, seed: int = 0, **data: object
) -> MixtureDataset:
    """The training mixture DataSources builds from (name, instances, target_ratio, max_repetition) sources,
    written under `root` unless already there."""
    configs = []
    for index, (name, size, ratio, repetition) in enumerate(sources):
        directory = root / name if (root / name).is_dir() else write_source(root, name, index, size)
        configs.append(DataSourceConfig(name, [str(directory)], ratio, repetition))
    config = DataConfig(sources=configs, **data)
    sources_ = DataSources(config, seq_len=SEQ, vocab_size=DATA_VOCAB, progress=False, instances=instances, seed=seed)
    return sources_.train


def origin(batch_ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(source index, instance within the source) that each row was read from, decoded from its first token."""
    first = batch_ids[:, 0].numpy()
    return first // STRIDE, (first % STRIDE) // SEQ


THREE = [("web", 1000, 0.5, 1.0), ("code", 500, 0.3, 1.0), ("books", 300, 0.2, 1.0)]


def test_each_source_gives_its_share_within_one_instance(tmp_path: Path) -> None:
    mixture = build(tmp_path, THREE, instances=997)
    assert len(mixture) == 997 and mixture.names == ["web", "code", "books"]
    batch = mixture.get_batch(np.arange(997))
    source, instance = origin(batch.input_ids)
    assert torch.equal(batch.source, torch.from_numpy(source))  # `source` names the source each row came from
    seen = tokens_per_source(batch, mixture.names)
    for s, (name, _, ratio, _) in enumerate(THREE):
        assert abs(seen[name] - ratio * 997 * SEQ) <= SEQ  # within one instance of the target tokens
        picked = instance[source == s]
        assert len(np.unique(picked)) == len(picked)  # max_repetition 1: no instance twice
    assert sum(seen.values()) == 997 * SEQ
    assert mixture_counts([0.5, 0.3, 0.2], 7) == [4, 2, 1]  # largest remainder: 3.5 -> 4, 2.1 -> 2, 1.4 -> 1
    assert mixture_counts([1 / 3] * 3, 10) == [4, 3, 3]


def test_a_short_source_is_repeated_in_whole_passes_then_a_sample(tmp_path: Path) -> None:
    """7 instances asked for 17: every instance twice, then 3 of them a third time."""
    sources = [("web", 1000, 0.83, 1.0), ("small", 7, 0.17, 3.0)]
    mixture = build(tmp_path, sources, instances=100)
    source, instance = origin(mixture.get_batch(np.arange(100)).input_ids)
    times = np.bincount(instance[source == 1], minlength=7)
    assert sorted(times.tolist()) == [2, 2, 2, 2, 3, 3, 3]
    again = build(tmp_path, sources, instances=100)
    assert torch.equal(again.get_batch(np.arange(100)).input_ids, mixture.get_batch(np.arange(100)).input_ids)
    samples = set()
    for seed in range(6):
        other = build(tmp_path, sources, instances=100, seed=seed)
        other_source, other_instance = origin(other.get_batch(np.arange(100)).input_ids)
        samples.add(tuple(np.flatnonzero(np.bincount(other_instance[other_source == 1]) == 3)))
    assert len(samples) > 1  # the sample follows the seed
    table = mixture.describe()
    assert "small" in table and "2 whole + 3 sampled" in table and "2.429" in table


def test_a_source_short_even_when_repeated_is_refused_naming_it(tmp_path: Path) -> None:
    sources = [("web", 1000, 0.83, 1.0), ("small", 7, 0.17, 2.0)]
    message = (
        r"data.sources\[small\]: target_ratio 0.17 of the run's 100 instances of 8 tokens needs 17 from it, but it "
        r"has 7 \(x max_repetition 2 = 14\) and lacks 24 tokens; add data, raise its max_repetition to 2.43"
    )
    with pytest.raises(DataError, match=message) as info:
        build(tmp_path, sources, instances=100)
    assert "\n" not in str(info.value)


def test_a_sample_is_a_permutation_of_the_source() -> None:
    for n in (1, 2, 3, 5, 16, 17, 1000, 4097):
        assert sorted(sample_permutation(n, 0, "web")(np.arange(n)).tolist()) == list(range(n))
    a, b = sample_permutation(1000, 0, "web"), sample_permutation(1000, 1, "web")
    assert not np.array_equal(a(np.arange(1000)), b(np.arange(1000)))
    huge = sample_permutation(1_500_000_000, 0, "cc")  # Dolma's scale: no table, any index at once
    out = huge(np.arange(0, 1_500_000_000, 1_000_000))
    assert out.min() >= 0 and out.max() < 1_500_000_000 and len(np.unique(out)) == len(out)


def one_line_error(kind: type[Exception], match: str, make) -> None:
    with pytest.raises(kind, match=match) as info:
        make()
    assert "\n" not in str(info.value)


def test_bad_mixtures_are_refused_in_one_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")

    def sources(*pairs: tuple[str, float]) -> list[DataSourceConfig]:
        return [DataSourceConfig(name, [missing], ratio) for name, ratio in pairs]

    def data_sources(config: DataConfig) -> DataSources:
        return DataSources(config, seq_len=SEQ, vocab_size=DATA_VOCAB, progress=False, instances=10, seed=0)

    # refused before any file is opened: the paths do not exist
    one_line_error(ConfigError, r"the target_ratio values sum to 0.9 \(a 0.5 \+ b 0.4\), not 1",
                   lambda: data_sources(DataConfig(sources=sources(("a", 0.5), ("b", 0.4)))))  # fmt: skip
    one_line_error(ConfigError, "two sources are named a",
                   lambda: data_sources(DataConfig(sources=sources(("a", 0.5), ("a", 0.5)))))  # fmt: skip
    one_line_error(ConfigError, "data.paths and data.sources are both set",
                   lambda: data_sources(DataConfig(paths=[missing], sources=sources(("a", 1.0)))))  # fmt: skip
    one_line_error(ConfigError, "a mixture \\(data.sources\\) takes none",
                   lambda: data_sources(DataConfig(label_mask_paths=[missing], sources=sources(("a", 1.0)))))  # fmt: skip
    one_line_error(ConfigError, r"data.sources\[a\] has no paths", lambda: DataSourceConfig("a", [], 1.0))
    one_line_error(ConfigError, r"target_ratio=0.0 must be in \(0, 1\]", lambda: DataSourceConfig("a", ["x"], 0.0))
    one_line_error(ConfigError, "max_repetition=0.5 must be >= 1", lambda: DataSourceConfig("a", ["x"], 1.0, 0.5))
    one_line_error(ConfigError, "name 'a/b' must be", lambda: DataSourceConfig("a/b", ["x"], 1.0))
    # a source whose paths hold no token files names the source
    (tmp_path / "empty").mkdir()
    write_source(tmp_path, "web", 0, 10)
    empty = [
        DataSourceConfig("web", [str(tmp_path / "web")], 0.5),
        DataSourceConfig("code", [str(tmp_path / "empty")], 0.5),
    ]
    one_line_error(
        DataError, r"data.sources\[code\]: .*empty: no token files", lambda: data_sources(DataConfig(sources=empty))
    )
    empty[1].paths = [missing]
    one_line_error(DataError, r"data.sources\[code\]: .*missing does not exist",
                   lambda: data_sources(DataConfig(sources=empty)))  # fmt: skip
    with pytest.raises(Exception, match="Could not override 'data.sources'"):  # an unknown key, from the schema
        compose_config(["data.sources=[{name:a,paths:[x],ratio:1.0}]"])


def test_dolma_mix_composes() -> None:
    config = compose_config(["data=dolma_mix", "data.sources.5.max_repetition=2"])
    names = [source.name for source in config.data.sources]
    assert names == ["cc", "c4", "stack", "reddit", "pes2o", "wiki", "gutenberg"]
    assert math.isclose(sum(source.target_ratio for source in config.data.sources), 1.0, abs_tol=1e-6)
    assert config.data.sources[5].max_repetition == 2.0 and config.data.paths == []
    assert all(source.paths[0].endswith("/" + source.name) for source in config.data.sources)


def test_the_mixture_is_fixed_by_the_seed_and_the_same_for_every_dp(tmp_path: Path) -> None:
    mixture = build(tmp_path, THREE, instances=96)
    rebuilt = build(tmp_path, THREE, instances=96)
    batches, other = GlobalBatches(mixture, 16, seed=3), GlobalBatches(rebuilt, 16, seed=3)
    for step in (0, 3, 5):
        whole = batches.batch(step)
        assert torch.equal(whole.input_ids, other.batch(step).input_ids)
        halves = [other.batch(step, dp_rank=rank, dp=2) for rank in range(2)]
        assert torch.equal(torch.cat([half.input_ids for half in halves]), whole.input_ids)
        assert torch.equal(torch.cat([half.source for half in halves]), whole.source)


def test_resume_gives_the_same_batches_and_tokens_seen(tmp_path: Path) -> None:
    sources = [("web", 1000, 0.83, 1.0), ("small", 7, 0.17, 3.0)]
    run = GlobalBatches(build(tmp_path, sources, instances=96), 8, seed=5, order_dir=tmp_path / "order")
    reference = [run.batch(step) for step in range(12)]
    interrupted = GlobalBatches(build(tmp_path, sources, instances=96), 8, seed=5, order_dir=tmp_path / "order")
    for step in range(5):
        interrupted.batch(step)
    state = json.loads(json.dumps(interrupted.state_dict()))
    mixture = build(tmp_path, sources, instances=96)
    resumed = GlobalBatches(mixture, 8, seed=5, order_dir=tmp_path / "order")
    resumed.load_state_dict(state)
    for step in range(5, 12):
        batch = resumed.next_batch()
        assert torch.equal(batch.input_ids, reference[step].input_ids)
        assert torch.equal(batch.source, reference[step].source)
    seen = TokensSeen(resumed)  # a resumed run's counter counts the steps before the resume too
    expected = {name: sum(tokens_per_source(b, mixture.names)[name] for b in reference[:7]) for name in mixture.names}
    assert seen(7) == expected
    assert seen(12) == {"web": 80 * SEQ, "small": 16 * SEQ}  # 12 steps of 8: the whole mixture, 79.68 -> 80
    assert seen(12) == tokens_per_source(mixture.get_batch(np.arange(96)), mixture.names)


def test_the_instance_filter_keeps_a_rows_source(tmp_path: Path) -> None:
    write_source(tmp_path, "web", 0, 50)
    write_source(tmp_path, "spam", 1, 50, constant=True)
    mixture = build(tmp_path, [("web", 50, 0.5, 1.0), ("spam", 50, 0.5, 1.0)], instances=40)
    repetition = RepetitionFilter.from_config(InstanceFilterConfig(enabled=True, repetition_max_count=4))
    batch = GlobalBatches(mixture, 40, seed=0, instance_filter=repetition).batch(0)
    assert torch.equal(batch.instance_mask, batch.source == 0)  # every "spam" instance dropped, no "web" one


def test_training_on_a_mixture(tmp_path: Path) -> None:
    """`python -m megaolmo.train data.sources=[...]`: two sources, each prepared on its own with one tokenizer."""
    write_dolma(tmp_path / "web.jsonl.gz", "web", 200, 0)
    write_dolma(tmp_path / "code.jsonl.gz", "code", 20, 1)
    prepare([tmp_path / "web.jsonl.gz"], tmp_path / "web", train_tokenizer_vocab=VOCAB, progress=False)
    tokenizer = tmp_path / "web" / "tokenizer.json"
    prepare([tmp_path / "code.jsonl.gz"], tmp_path / "code", tokenizer_path=tokenizer, progress=False)
    sources = (f"[{{name:web,paths:[{tmp_path / 'web'}],target_ratio:0.75}},"
               f"{{name:code,paths:[{tmp_path / 'code'}],target_ratio:0.25,max_repetition:2}}]")  # fmt: skip
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=2", "data=dolma_mix", f"data.sources={sources}", f"data.tokenizer={tokenizer}"]
    result = train(args, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data mixture: 16 instances of 64 tokens (seed 0)" in result.stdout  # 2 steps x 8 sequences
    assert "web" in result.stdout and "code" in result.stdout
    assert len(losses(run_dir)) == 2 and all(math.isfinite(loss) for loss in losses(run_dir))
