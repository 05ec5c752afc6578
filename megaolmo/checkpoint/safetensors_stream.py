"""safetensors files read and written one tensor at a time, so a converter of a 65B model holds one tensor.

safetensors' own `save_file` takes every tensor at once, and `safe_open` hands out views of a memory map
of the whole file, whose pages stay resident for as long as the file is open. The format needs neither:

    8 bytes    N, little-endian: the length of the header
    N bytes    JSON {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
               "__metadata__": {"format": "pt"}}, padded with spaces so that the data starts 8-byte aligned
    the rest   each tensor's raw little-endian, row-major bytes, at its offsets from the end of the header

Every name, shape and dtype is known before the first tensor is read, so the header is written first and
each tensor's bytes follow as it arrives. Reading seeks to a tensor's offsets and fills memory the caller owns.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megaolmo.errors import CheckpointError

# Name, shape and dtype of each tensor of a file, in the order its bytes are stored.
Specs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]

# safetensors' dtype names in the order of its Rust `Dtype` enum: `save_file` stores the tensors of a
# file by that order, last first, then by name, and `save_file_order` follows it.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
DTYPES_BY_NAME = {code: dtype for dtype, code in DTYPE_NAMES.items()}


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def save_file_order(specs: Specs) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """`specs` in the order safetensors' `save_file` lays tensors out, so that a file of ours is byte for
    byte the file `save_file` would write of the same tensors."""
    rank = list(DTYPE_NAMES)
    return dict(sorted(specs.items(), key=lambda item: (-rank.index(item[1][1]), item[0])))


def _dtype_name(name: str, dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise CheckpointError(
            f"tensor {name} has dtype {dtype}, which megaolmo does not write to safetensors; "
            "cast it to float32, bfloat16 or float16 (convert's --dtype)"
        )
    return DTYPE_NAMES[dtype]


def write_safetensors(path: Path, specs: Specs, read: Callable[[str], torch.Tensor]) -> None:
    """Write the safetensors file `path` holding the tensors of `specs`, stored in that order.

    `read(name)` is called once per name, in that order, and its tensor is dropped as soon as its bytes
    are written, so the caller decides how much is held at once (one tensor, when it reads lazily).
    """
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in specs.items():
        size = tensor_bytes(shape, dtype)
        header[name] = {
            "dtype": _dtype_name(name, dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, (shape, dtype) in specs.items():
            tensor = read(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise RuntimeError(  # a bug in the caller: the bytes would not match the header written above
                    f"{path}: read({name!r}) gave {tuple(tensor.shape)} {tensor.dtype}, the header says {shape} {dtype}"
                )
            handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor  # before the next read, which may be of the largest tensor


class SafetensorsReader:
    """The tensors of one safetensors file, each read on its own into memory the caller owns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with safe_open(str(path), framework="pt"):
                pass  # opening checks the header against the file: offsets contiguous, sizes, length
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
        header.pop("__metadata__", None)
        self.specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._offsets: dict[str, int] = {}
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
            if info["dtype"] not in DTYPES_BY_NAME:
                raise CheckpointError(
                    f"{path}: tensor {name} has dtype {info['dtype']}, which megaolmo does not read; "
                    "save it as F32, BF16 or F16"
                )
            self.specs[name] = (tuple(info["shape"]), DTYPES_BY_NAME[info["dtype"]])
            self._offsets[name] = 8 + header_size + info["data_offsets"][0]

    def read_rectangle(self, name: str, offsets: tuple[int, ...], out: torch.Tensor) -> None:
        """Copy the part of tensor `name` that starts at `offsets` and has `out`'s shape into `out` (any dtype).

        The file is memory-mapped, so only the pages holding the rectangle are read: a rank's share of a
        row band is one contiguous range, a column slice touches a strided set of pages.
        """
        shape, dtype = self.specs[name]
        count = math.prod(shape)
        with open(self.path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            end = self._offsets[name] + count * dtype.itemsize
            if end > len(mapped):
                raise CheckpointError(f"{self.path}: tensor {name} is cut short; the file is truncated")
            with warnings.catch_warnings():  # the mapping is read-only, and so is everything made of it
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                raw = torch.frombuffer(
                    mapped, dtype=torch.uint8, count=count * dtype.itemsize, offset=self._offsets[name]
                )
            tensor = raw.view(dtype).view(shape)
            for dim, (start, length) in enumerate(zip(offsets, out.shape)):
                tensor = tensor.narrow(dim, start, length)
            out.copy_(tensor)
            del raw, tensor  # no view of the mapping may outlive it

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name`, whole, on CPU, in a buffer of its own: nothing of the file stays mapped."""
        shape, dtype = self.specs[name]
        tensor = torch.empty(shape, dtype=dtype)
        buffer = tensor.reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "rb") as handle:
            handle.seek(self._offsets[name])
            got = handle.readinto(buffer)
        if got != len(buffer):
            raise CheckpointError(
                f"{self.path}: tensor {name} is cut short ({got} of {len(buffer)} bytes); the file is truncated"
            )
        return tensor
