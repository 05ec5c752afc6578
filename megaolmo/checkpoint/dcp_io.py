"""torch.distributed.checkpoint, fed with `Share`s: each rank writes and reads only its pieces, in place.

DCP's default planners take whole tensors or DTensors. These take `Share`s (shares.py):
every piece becomes one chunk of the unsharded tensor in DCP's metadata, written
from a view of the rank's storage and read back into that same view. DCP reshards
on load as usual: a rank reads exactly the saved chunks that overlap its pieces.

The writer hashes every file, and every item in it, while writing it, and the reader
checks each item it reads against its digest as it reads it: integrity costs no
second read of the checkpoint, at save or at resume, and each rank checks exactly
the bytes it loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from megaolmo.checkpoint.shares import Share
from megaolmo.errors import CheckpointError


def _chunk(offsets: tuple[int, ...], local: torch.Tensor) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=local.size())


# What a checkpoint holds under one key: a tensor's share, or bytes every rank holding them has alike.
Entry = Share | io.BytesIO


class ShareSavePlanner(DefaultSavePlanner):
    """Plans one write item per piece; DCP's global planning (replica dedup, metadata) is the default one."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict[str, Entry], storage_meta=None, is_coordinator: bool = False) -> None:
        self.entries, self.state_dict, self.is_coordinator = state_dict, {}, is_coordinator
        self._data = {}
        for fqn, entry in state_dict.items():
            if isinstance(entry, Share):
                self._data.update({(fqn, piece.offsets): piece.local for piece in entry.pieces})
            else:
                self._data[(fqn, None)] = entry

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, entry in self.entries.items():
            if not isinstance(entry, Share):
                items.append(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
                continue
            items.extend(
                WriteItem(
                    index=MetadataIndex(fqn, torch.Size(piece.offsets)),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=_chunk(piece.offsets, piece.local),
                        properties=TensorProperties.create_from_tensor(piece.local),
                        size=torch.Size(entry.shape),
                    ),
                )
                for piece in entry.pieces
            )
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        offset = write_item.index.offset
        return self._data[(write_item.index.fqn, None if offset is None else tuple(offset))]


def read_items(fqn: str, entry: Entry, metadata: Metadata) -> list[ReadItem]:
    """The reads (saved chunk -> piece) that fill `entry` from a checkpoint of `metadata`."""
    stored = metadata.state_dict_metadata[fqn]
    if not isinstance(entry, Share):
        index = MetadataIndex(fqn)
        zero = torch.Size((0,))
        return [ReadItem(LoadItemType.BYTE_IO, index, zero, index, zero, zero)]
    if not isinstance(stored, TensorStorageMetadata):
        raise TypeError(f"{fqn} is not a tensor in the checkpoint")
    chunks = [_chunk(piece.offsets, piece.local) for piece in entry.pieces]
    return create_read_items_for_chunk_list(fqn, stored, chunks)


def _narrow(tensor: torch.Tensor, offsets: torch.Size, lengths: torch.Size) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, offset, length)
    return tensor


class ShareLoadPlanner(DefaultLoadPlanner):
    """Plans the reads that fill each piece; DCP copies every read straight into the piece's view."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict[str, Entry], metadata=None, is_coordinator: bool = False) -> None:
        self.entries, self.state_dict = state_dict, {}
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        return LoadPlan([item for fqn, entry in self.entries.items() for item in read_items(fqn, entry, self.metadata)])

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        piece = self.entries[read_item.dest_index.fqn].pieces[read_item.dest_index.index]
        return _narrow(piece.local, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        """Nothing to do: the data was copied into the piece's view of the rank's storage."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        target = self.entries[read_item.dest_index.fqn]
        target.seek(0)
        target.truncate()
        target.write(value.read())


class _HashingStream(io.RawIOBase):
    """A write-only stream that hashes what passes through it: the whole file, and each item on its own.

    DCP's writer asks `tell()` right before and right after each item it writes; those calls cut the
    per-item digests (`segments`: start offset -> (length, sha256)).
    """

    def __init__(self, raw) -> None:
        super().__init__()
        self.raw, self.sha256, self.bytes = raw, hashlib.sha256(), 0
        self.segments: dict[int, tuple[int, str]] = {}
        self._segment, self._segment_start = hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self._segment.update(view)
        self.bytes += len(view)
        return self.raw.write(view)

    def tell(self) -> int:
        position = self.raw.tell()
        if position > self._segment_start:
            self.segments[self._segment_start] = (position - self._segment_start, self._segment.hexdigest())
        self._segment, self._segment_start = hashlib.sha256(), position
        return position

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        super().close()  # flushes first
        self.raw.close()


class _HashingFileSystem(FileSystem):
    """DCP's local file system, keeping what `_HashingStream` saw of every file it writes, by final file name."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, _HashingStream] = {}

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = _HashingStream(stream)
            yield hashing
            self.written[Path(path).name] = hashing

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        if Path(path).name in self.written:
            self.written[Path(new_path).name] = self.written.pop(Path(path).name)


class HashingWriter(FileSystemWriter):
    """`FileSystemWriter` that hashes every file it writes, and every item in it, as it writes them.

    `digests` is what the manifest records of this rank's files: {name: {"bytes", "sha256", "items":
    {offset: sha256}}}; a resume checks each item it reads against it, and never hashes a whole file.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.fs = _HashingFileSystem()
        self._items: dict[str, dict[str, str]] = {}

    def write_data(self, plan: SavePlan, planner) -> Future[list[WriteResult]]:
        future = super().write_data(plan, planner)
        for result in future.wait():
            info = result.storage_data
            segment = self.fs.written[info.relative_path].segments.get(info.offset)
            if segment is None or segment[0] != info.length:
                raise AssertionError(f"DCP wrote {result.index.fqn} without marking its bounds; cannot digest it")
            self._items.setdefault(info.relative_path, {})[str(info.offset)] = segment[1]
        return future

    @property
    def digests(self) -> dict[str, dict]:
        return {
            name: {"bytes": stream.bytes, "sha256": stream.sha256.hexdigest(), "items": self._items.get(name, {})}
            for name, stream in self.fs.written.items()
        }


class VerifyingReader(FileSystemReader):
    """`FileSystemReader` that checks each item it reads against its sha256 in the manifest, as it reads it.

    Every byte read is hashed once and read once; `bytes_verified` counts them.
    """

    def __init__(self, path: Path, files: dict[str, dict]) -> None:
        super().__init__(str(path))
        if hasattr(self, "thread_count"):
            self.thread_count = 1  # items one at a time, each verified on the calling thread
        self.files, self.bytes_verified = files, 0

    def _slice_file(self, file, sinfo) -> io.BytesIO:
        expected = self.files.get(sinfo.relative_path, {}).get("items", {}).get(str(sinfo.offset))
        file.seek(sinfo.offset)
        data = file.read(sinfo.length)
        where = f"{Path(self.path).name}/{sinfo.relative_path} at byte {sinfo.offset}"
        if len(data) != sinfo.length:
            raise CheckpointError(f"{where}: {len(data)} of {sinfo.length} bytes (truncated?)")
        if expected is None or hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"{where} does not match its sha256 in the manifest (corrupted)")
        self.bytes_verified += len(data)
        return io.BytesIO(data)


def read_entries(reader: FileSystemReader, metadata: Metadata, entries: dict[str, Entry]) -> None:
    """Fill `entries` from a checkpoint, in this process alone: every rank plans its own reads (no collective)."""
    planner = ShareLoadPlanner()
    planner.set_up_planner(entries, metadata, is_coordinator=True)
    reader.set_up_storage_reader(metadata, is_coordinator=True)
    plan = reader.prepare_local_plan(planner.create_local_plan())
    reader.read_data(plan, planner).wait()
