"""Token memmaps -> fixed-length instances -> global batches in a layout-independent order.

OLMo's rules, so OLMo's own memmaps read unchanged: instance i of a file is tokens[i*L:(i+1)*L]
(trailing tokens that do not fill an instance are dropped, instances cross document boundaries),
the instances of all files are concatenated in path order, and epoch e visits them in the order
`PCG64(seed + e).permutation(n)`. Unlike OLMo, which strides that order by rank, a global batch is
a contiguous slice of it and each data-parallel rank takes a contiguous block of rows, so the data
seen at every step is the same whatever the TP/PP/DP layout, and a run can resume on another one.

Beside the tokens, OLMo's data controls: label masks (`label_mask_paths`, one np.bool_ memmap per
token file, read with the same slices: True where a token is a training target) and an instance
filter (megaolmo.data.filter, applied by GlobalBatches to any dataset, a mixture too), which masks out
every target of the instances it drops. A batch is a `Batch`: token ids, and the masks the data has.

Files are opened lazily (construction only stats them and reads metadata.json) and read through
megaolmo.data.memmap_cache, which bounds the memmaps open in the process, so a dataset of thousands of
files stays within the file-descriptor limit and pickles (for DataLoader workers) without open files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from megaolmo.data.batch import Batch
from megaolmo.data.filter import RepetitionFilter
from megaolmo.data.memmap_cache import read_slice
from megaolmo.data.metadata import METADATA_FILE, read_metadata
from megaolmo.data.order import build_order, open_order, order_path
from megaolmo.data.tokenizer import tokenizer_fingerprint as fingerprint_of
from megaolmo.errors import DataError

TOKEN_DTYPES = ("uint8", "uint16", "uint32", "uint64")
NPY_MAGIC = b"\x93NUMPY"  # what np.save writes first: a header that raw memmaps do not have


def memmap_files(paths: Sequence[str | Path], what: str = "token") -> list[Path]:
    """Memmap files in order; a directory stands for its `*.npy` files, sorted."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.glob("*.npy"))
            if not found:
                raise DataError(f"{path}: no {what} files (*.npy) in this directory; prepare the data first")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{what} file {path} does not exist; check the data paths")
    if not files:
        raise DataError(f"no {what} files given; pass at least one memmap path")
    return files


def _label_mask_files(label_mask_paths: Sequence[str | Path], token_files: list[Path], tokens: list[int]) -> list[Path]:
    """The label mask of each token file, checked: mask i goes with token file i (OLMo's pairing), both
    lists expanded the same way, and holds one np.bool_ (one byte) per token of it."""
    masks = memmap_files(label_mask_paths, "label mask")
    if len(masks) != len(token_files):
        raise DataError(
            f"{len(masks)} label mask files for {len(token_files)} token files; give one mask per token file, in "
            f"the same order (a directory stands for its *.npy files, sorted: e.g. DIR/label_masks for DIR)"
        )
    for mask, path, n_tokens in zip(masks, token_files, tokens):
        size = mask.stat().st_size
        if size == n_tokens:
            continue
        with open(mask, "rb") as f:
            if f.read(len(NPY_MAGIC)) == NPY_MAGIC:
                raise DataError(
                    f"label mask {mask} is an .npy file with a header (np.save); label masks are raw np.bool_ "
                    "memmaps: write them with mask.astype(np.bool_).tofile(path)"
                )
        per_token = size // n_tokens if n_tokens and size % n_tokens == 0 else None
        if per_token in (2, 4, 8):
            raise DataError(
                f"label mask {mask} has {per_token} bytes per token of {path} ({n_tokens} tokens): a label mask is "
                "np.bool_, one byte per token; write it with mask.astype(np.bool_).tofile(path)"
            )
        raise DataError(
            f"label mask {mask} has {size} entries but its token file {path} has {n_tokens} tokens; "
            "each mask needs one np.bool_ per token of the token file at its position"
        )
    return masks


def _file_dtype(path: Path, dtype: np.dtype | str | None, metadata: dict | None) -> np.dtype:
    """The token dtype of `path`: from metadata.json beside it, else the caller's; they must agree."""
    given = None
    if dtype is not None:
        try:
            given = np.dtype(dtype)
        except TypeError:
            raise DataError(f"dtype {dtype!r} is not a numpy dtype; use one of {', '.join(TOKEN_DTYPES)}") from None
        if given.name not in TOKEN_DTYPES:
            raise DataError(f"dtype {given.name} cannot hold token ids; use one of {', '.join(TOKEN_DTYPES)}")
    if metadata is None:
        if given is None:
            raise DataError(
                f"{path} has no {METADATA_FILE} beside it: pass dtype for memmaps without metadata.json "
                "(uint16 for a vocab under 65536, else uint32)"
            )
        return given
    recorded = np.dtype(metadata["dtype"])
    if given is not None and given != recorded:
        raise DataError(f"{path}: dtype {given.name} was passed but {METADATA_FILE} says {recorded.name}; drop dtype")
    return recorded


def inspect_token_file(path: Path, dtype: np.dtype | str | None, metadata: dict | None) -> tuple[np.dtype, int, dict]:
    """(dtype, tokens, its metadata.json entry or {}) of the token file `path`, checked against that metadata
    (`metadata`: its directory's). Only stats the file: opening it waits for the first read."""
    file_dtype = _file_dtype(path, dtype, metadata)
    size = path.stat().st_size
    if size % file_dtype.itemsize:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of {file_dtype.name} tokens "
            f"({file_dtype.itemsize} bytes each); wrong dtype or a truncated file"
        )
    n_tokens = size // file_dtype.itemsize
    entry = ((metadata or {}).get("files") or {}).get(path.name, {})
    recorded = entry.get("tokens")
    if recorded is not None and recorded != n_tokens:
        raise DataError(
            f"{path}: {n_tokens} tokens but {METADATA_FILE} records {recorded}; the file is damaged, prepare it again"
        )
    return file_dtype, n_tokens, entry


class MemmapDataset:
    """Fixed-length instances over raw token memmaps (OLMo's layout); items are int64 tensors [seq_len],
    batches `Batch`es, with the label masks of `label_mask_paths` when given."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        seq_len: int,
        dtype: np.dtype | str | None = None,
        *,
        label_mask_paths: Sequence[str | Path] = (),
    ) -> None:
        if not isinstance(seq_len, int) or seq_len < 1:
            raise DataError(f"seq_len={seq_len!r} must be a positive integer")
        self.seq_len = seq_len
        self.paths = memmap_files(paths)
        metadata: dict[Path, dict | None] = {}
        self.dtypes: list[np.dtype] = []
        tokens: list[int] = []
        for path in self.paths:
            if path.parent not in metadata:
                metadata[path.parent] = read_metadata(path.parent)
            file_dtype, n_tokens, _ = inspect_token_file(path, dtype, metadata[path.parent])
            self.dtypes.append(file_dtype)
            tokens.append(n_tokens)
        self.instances_per_file = [n // seq_len for n in tokens]
        self._starts = np.concatenate([[0], np.cumsum(self.instances_per_file)]).astype(np.int64)
        self.label_mask_paths = _label_mask_files(label_mask_paths, self.paths, tokens) if label_mask_paths else None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        """(file, first token) of instance `index` (global)."""
        if not 0 <= index < len(self):
            raise IndexError(f"instance {index} out of range for a dataset of {len(self)} instances")
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f, (index - int(self._starts[f])) * self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        f, start = self._locate(int(index))
        tokens = read_slice(self.paths[f], self.dtypes[f], start, start + self.seq_len)
        return torch.from_numpy(tokens.astype(np.int64))

    def get_batch(self, indices: np.ndarray | Sequence[int]) -> Batch:
        """Instances `indices` as a Batch: int64 token ids [len(indices), seq_len] and, with label_mask_paths,
        their label masks."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        tokens = np.empty((len(indices), self.seq_len), dtype=np.int64)
        masks = None if self.label_mask_paths is None else np.empty(tokens.shape, dtype=np.bool_)
        for row, index in enumerate(indices):
            f, start = self._locate(int(index))
            tokens[row] = read_slice(self.paths[f], self.dtypes[f], start, start + self.seq_len)
            if masks is not None:
                masks[row] = read_slice(self.label_mask_paths[f], np.bool_, start, start + self.seq_len)
        return Batch(torch.from_numpy(tokens), label_mask=None if masks is None else torch.from_numpy(masks))


def global_order(n_instances: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the instances (OLMo's rule: PCG64(seed + epoch))."""
    return np.random.Generator(np.random.PCG64(seed + epoch)).permutation(n_instances)


class GlobalBatches:
    """Global batches of a dataset by global step, the same whatever the parallel layout.

    Step s of epoch e = s // batches_per_epoch takes the next `global_batch_size` instances of
    `global_order(n, seed, e)`; the last partial batch of an epoch is dropped. The state is counted
    in samples (global units), so a run resumed on another data-parallel size continues exactly.
    With `order_dir`, each epoch's order is read from a memory-mapped file there (megaolmo.data.order)
    instead of a whole permutation in every rank's memory: the same order, 12 GB fewer per rank at
    1.5 B instances. With `instance_filter`, a batch's `instance_mask` says which of its rows the filter
    keeps: a function of each row's tokens, so the same on every layout and after a resume.
    """

    def __init__(
        self,
        dataset: MemmapDataset,
        global_batch_size: int,
        seed: int,
        *,
        order_dir: Path | None = None,
        instance_filter: RepetitionFilter | None = None,
    ) -> None:
        if not isinstance(global_batch_size, int) or global_batch_size < 1:
            raise DataError(f"global_batch_size={global_batch_size!r} must be a positive integer")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.batches_per_epoch = len(dataset) // global_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"data has {len(dataset)} instances of {dataset.seq_len} tokens, fewer than one global batch of "
                f"{global_batch_size}; add data or shrink the batch or the sequence length"
            )
        self.order_dir = None if order_dir is None else Path(order_dir)
        self.instance_filter = instance_filter
        self.samples_seen = 0
        self._epoch: int | None = None
        self._order: np.ndarray | None = None

    @property
    def step(self) -> int:
        """The next global step to train (batches already seen)."""
        return self.samples_seen // self.global_batch_size

    @property
    def epoch(self) -> int:
        return self.epoch_of(self.step)

    def epoch_of(self, step: int) -> int:
        """The epoch that global step `step` reads from."""
        return step // self.batches_per_epoch

    def prepare_order(self, epoch: int) -> Path | None:
        """Build epoch `epoch`'s order file in `order_dir` unless it is there; None without `order_dir`.

        A coordinator calls this on one process before the others read the epoch, so the order is
        built once, not once per rank; `indices` builds a missing file itself, so skipping it stays correct.
        """
        if self.order_dir is None:
            return None
        path = order_path(self.order_dir, len(self.dataset), self.seed, epoch)
        return path if path.is_file() else build_order(self.order_dir, len(self.dataset), self.seed, epoch)

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of global batch `step`: a small int64 copy, never a view of the whole order."""
        if step < 0:
            raise DataError(f"step {step} must be >= 0")
        epoch, position = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            if self.order_dir is None:
                self._order = global_order(len(self.dataset), self.seed, epoch)
            else:
                self.prepare_order(epoch)
                self._order = open_order(self.order_dir, len(self.dataset), self.seed, epoch)
            self._epoch = epoch
        size = self.global_batch_size
        return self._order[position * size : (position + 1) * size].astype(np.int64)

    def batch(self, step: int, dp_rank: int = 0, dp: int = 1) -> Batch:
        """Global batch `step` [B, L]; with dp > 1, only rows of `dp_share` (and only those are read).

        Records `step + 1` batches as seen, so `state_dict()` after training step s resumes at s + 1.
        """
        rows = dp_rows(self.global_batch_size, dp_rank, dp)
        batch = self.dataset.get_batch(self.indices(step)[rows])
        if self.instance_filter is not None:
            keep = self.instance_filter.keep(batch.input_ids.numpy())
            batch = dataclasses.replace(batch, instance_mask=torch.from_numpy(keep))
        self.samples_seen = (step + 1) * self.global_batch_size
        return batch

    def next_batch(self, dp_rank: int = 0, dp: int = 1) -> Batch:
        """The batch after the last one seen (the step recorded in the state)."""
        return self.batch(self.step, dp_rank, dp)

    @staticmethod
    def dp_share(batch: Batch, dp_rank: int, dp: int) -> Batch:
        """Rows [r*B/dp, (r+1)*B/dp) of a global batch: data-parallel rank r's contiguous share."""
        return batch.rows(dp_rows(len(batch), dp_rank, dp))

    def state_dict(self) -> dict[str, int]:
        return {
            "samples_seen": self.samples_seen,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "instances": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state` stopped; the seed, global batch size and number of instances must be those
        it was saved with (another number would be another order: some instances seen twice, others never)."""
        saved = state.get("instances", len(self.dataset))  # states of older runs do not record it
        if saved != len(self.dataset):
            raise DataError(
                f"data state was saved over {saved} instances but this run's data has {len(self.dataset)}; resume "
                "with the same data (and, with data.sources, the same trainer.max_steps and global batch size)"
            )
        for key in ("seed", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"data state was saved with {key}={state[key]} but this run has {key}={getattr(self, key)}; "
                    f"resume with {key}={state[key]}"
                )
        samples = int(state["samples_seen"])
        if samples < 0 or samples % self.global_batch_size:
            raise DataError(
                f"data state samples_seen={samples} is not a whole number of global batches of {self.global_batch_size}"
            )
        self.samples_seen = samples


def dp_rows(global_batch_size: int, dp_rank: int, dp: int) -> slice:
    """The rows of a global batch that data-parallel rank `dp_rank` of `dp` trains on."""
    if dp < 1 or global_batch_size % dp:
        raise DataError(f"global batch of {global_batch_size} does not split over dp={dp}; make it a multiple of dp")
    if not 0 <= dp_rank < dp:
        raise DataError(f"dp_rank={dp_rank} is outside 0..{dp - 1}")
    share = global_batch_size // dp
    return slice(dp_rank * share, (dp_rank + 1) * share)


def _metadata_dirs(where: str | Path | Sequence[str | Path]) -> list[Path]:
    """The directories whose metadata.json describes `where` (a data dir, a metadata.json, or token files)."""
    items = [where] if isinstance(where, (str, Path)) else list(where)
    dirs: list[Path] = []
    for raw in items:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"data path {path} does not exist; check the data paths")
        directory = path if path.is_dir() else path.parent
        if directory not in dirs:
            dirs.append(directory)
    return dirs


def check_compatible(
    metadata_dir_or_paths: str | Path | Sequence[str | Path], tokenizer_fingerprint: str | Path | None, vocab_size: int
) -> None:
    """Refuse data made with another tokenizer, or holding ids beyond the model's vocab, in one line.

    `tokenizer_fingerprint` is the expected fingerprint (a hex string), or a `Path` to the tokenizer
    file itself; None skips the tokenizer check (the vocab is still checked). Data without
    metadata.json (e.g. OLMo's own memmaps) cannot be checked and passes.
    """
    if isinstance(tokenizer_fingerprint, Path):
        tokenizer_fingerprint = fingerprint_of(tokenizer_fingerprint)
    for directory in _metadata_dirs(metadata_dir_or_paths):
        meta = read_metadata(directory)
        if meta is None:
            continue
        found = meta.get("tokenizer_fingerprint")
        if tokenizer_fingerprint is not None and found != tokenizer_fingerprint:
            raise DataError(
                f"data in {directory} was tokenized with tokenizer {str(found)[:12]}.. but the model expects "
                f"{tokenizer_fingerprint[:12]}..; prepare it again with --tokenizer <the model's tokenizer.json>"
            )
        data_vocab = int(meta["vocab_size"])
        if data_vocab > vocab_size:
            raise DataError(
                f"data in {directory} has vocab {data_vocab}, which exceeds model.vocab_size={vocab_size}; "
                f"set model.vocab_size >= {data_vocab} or prepare the data with the model's tokenizer"
            )
