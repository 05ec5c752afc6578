"""Thousands of token files within the file-descriptor limit: the process-wide bound on open memmaps.

Each case runs in a subprocess whose soft RLIMIT_NOFILE is lowered to 64, so this process keeps its
limit; every memmap holds a descriptor, so one memmap kept per file fails after about 60 files.
"""

from __future__ import annotations

import os
import pickle
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megaolmo.data import DataError, MemmapDataset
from megaolmo.data.memmap_cache import MAX_OPEN_ENV, max_open_memmaps

FILES, INSTANCES_PER_FILE, SEQ_LEN = 300, 3, 4
FD_LIMIT = 64


def write_files(directory: Path, prefix: str, count: int, tag: int) -> None:
    """`count` raw uint16 memmaps whose every token says (tag, file, position): token = tag*10000 + file*10 + i."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in range(count):
        tokens = tag * 10000 + f * 10 + np.arange(INSTANCES_PER_FILE * SEQ_LEN) // SEQ_LEN
        tokens.astype(np.uint16).tofile(directory / f"{prefix}-{f:04d}.npy")


READ_EVERYTHING = textwrap.dedent(
    """
    import os, resource, sys
    import numpy as np
    from megaolmo.data import MemmapDataset
    from megaolmo.data.memmap_cache import max_open_memmaps

    resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    baseline = len(os.listdir("/proc/self/fd"))
    datasets = [MemmapDataset([sys.argv[1] + "/" + name], {seq_len}, "uint16") for name in sys.argv[2:]]
    most = 0
    for index in np.random.default_rng(0).permutation(sum(len(d) for d in datasets)):
        d, i = divmod(int(index), len(datasets[0]))
        batch = datasets[d].get_batch([i]).input_ids[0]
        item = datasets[d][i]
        expected = d * 10000 + (i // {per_file}) * 10 + i % {per_file}
        assert (batch == expected).all() and (item == expected).all(), (d, i, batch, expected)
        most = max(most, len(os.listdir("/proc/self/fd")))
    print(baseline, most, max_open_memmaps())
    """
)


def read_in_subprocess(root: Path, subdirs: list[str], env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(descriptors open before reading, most open while reading, the bound) of a child reading every
    instance of the datasets `subdirs` of `root` in a random order, interleaving the datasets."""
    script = READ_EVERYTHING.format(limit=FD_LIMIT, seq_len=SEQ_LEN, per_file=INSTANCES_PER_FILE)
    result = subprocess.run(
        [sys.executable, "-c", script, str(root), *subdirs],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    baseline, most, bound = (int(word) for word in result.stdout.split())
    return baseline, most, bound


def test_reading_more_files_than_the_descriptor_limit_keeps_descriptors_bounded(tmp_path: Path) -> None:
    """300 files over three datasets (one bound for the whole process, as for a mixture's sources), read in a
    random order under `ulimit -n 64`: every instance is right and at most the bound of memmaps is open."""
    for tag, name in enumerate(["a", "b", "c"]):
        write_files(tmp_path / name, name, FILES // 3, tag)
    baseline, most, bound = read_in_subprocess(tmp_path, ["a", "b", "c"])
    assert bound == FD_LIMIT // 4
    assert most <= baseline + bound + 1, (baseline, most, bound)  # + 1: the listing's own descriptor


def test_the_knob_sets_the_bound_within_the_descriptor_limit(tmp_path: Path, monkeypatch) -> None:
    """$MEGAOLMO_MAX_OPEN_MEMMAPS lowers the bound; it never rises above a quarter of the soft limit."""
    write_files(tmp_path / "a", "a", FILES // 3, 0)
    baseline, most, bound = read_in_subprocess(tmp_path, ["a"], env={MAX_OPEN_ENV: "3"})
    assert bound == 3 and most <= baseline + bound + 1
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    monkeypatch.setenv(MAX_OPEN_ENV, "100000")
    assert max_open_memmaps() == (100000 if soft == resource.RLIM_INFINITY else min(100000, soft // 4))
    monkeypatch.setenv(MAX_OPEN_ENV, "lots")
    with pytest.raises(DataError, match=MAX_OPEN_ENV):
        max_open_memmaps()


def test_a_dataset_pickles_after_reading_and_reads_the_same(tmp_path: Path) -> None:
    """DataLoader workers get the dataset pickled: it holds no open file, and the copy reads the same rows."""
    write_files(tmp_path / "a", "a", 5, 0)
    dataset = MemmapDataset([tmp_path / "a"], SEQ_LEN, "uint16")
    before = dataset.get_batch([0, 7, 14]).input_ids
    copy = pickle.loads(pickle.dumps(dataset))
    assert (copy.get_batch([0, 7, 14]).input_ids == before).all()
    assert (copy[14] == before[2]).all()
