"""Convert between megaolmo checkpoints, Hugging Face `OlmoForCausalLM`, `Olmo2ForCausalLM` and
`Olmo3ForCausalLM` models, and allenai/OLMo checkpoints (OLMo-1's or OLMo-2's options).

    python -m megaolmo.convert from-hf   HF_DIR    OUT_DIR
    python -m megaolmo.convert to-hf     CKPT_DIR  HF_DIR
    python -m megaolmo.convert from-olmo OLMO_DIR  OUT_DIR
    python -m megaolmo.convert consolidate CKPT_DIR OUT_DIR   (a sharded training checkpoint, any layout)

Every input is validated in full (config, tensor names, shapes, shards) before
anything is written; a bad input ends with one line on stderr and exit code 2. to-hf
writes the transformers class of the checkpoint's generation (model.arch), and refuses
a model that class would compute differently (OLMo-2/3 with clip_qkv, for one).
to-hf and consolidate stream a megaolmo checkpoint tensor by tensor (a 65B model is
~260 GB in fp32); from-hf and from-olmo read their input whole.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megaolmo.checkpoint import open_tensors, save_consolidated, write_consolidated
from megaolmo.convert.allenai_olmo import read_olmo_dir
from megaolmo.convert.hf import read_hf_dir, state_from_hf, write_hf_dir
from megaolmo.errors import MegaolmoError, report

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cast(state: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    return state if dtype is None else {k: v.to(DTYPES[dtype]) for k, v in state.items()}


def dtype_of(args: argparse.Namespace) -> torch.dtype | None:
    return None if args.dtype is None else DTYPES[args.dtype]


def from_hf(args: argparse.Namespace) -> None:
    config, tensors = read_hf_dir(Path(args.src))
    state = state_from_hf(config, tensors, str(args.src))
    save_consolidated(args.dst, config, cast(state, args.dtype))


def to_hf(args: argparse.Namespace) -> None:
    tensors = open_tensors(args.src)
    write_hf_dir(
        Path(args.dst),
        tensors.config,
        tensors.specs,
        tensors.read,
        dtype=dtype_of(args),
        max_shard_bytes=int(args.max_shard_gb * 2**30),
        source=str(args.src),
    )


def consolidate(args: argparse.Namespace) -> None:
    tensors = open_tensors(args.src)
    write_consolidated(args.dst, tensors.config, tensors.specs, tensors.read, dtype=dtype_of(args))


def from_olmo(args: argparse.Namespace) -> None:
    config, state = read_olmo_dir(Path(args.src))
    save_consolidated(args.dst, config, cast(state, args.dtype))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megaolmo.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func, src, dst in (
        ("from-hf", from_hf, "HF_DIR", "OUT_DIR"),
        ("to-hf", to_hf, "CKPT_DIR", "HF_DIR"),
        ("from-olmo", from_olmo, "OLMO_DIR", "OUT_DIR"),
        ("consolidate", consolidate, "CKPT_DIR", "OUT_DIR"),
    ):
        sub = commands.add_parser(name, help=f"{src} -> {dst}")
        sub.add_argument("src", metavar=src)
        sub.add_argument("dst", metavar=dst, help="a new (or empty) directory")
        sub.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep their dtype)")
        if name == "to-hf":
            sub.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard")
        sub.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except MegaolmoError as err:
        return report(err)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
