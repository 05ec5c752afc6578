"""python -m megaolmo.bench SUITE [options]."""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megaolmo.bench")
    suites = parser.add_subparsers(dest="suite", required=True)
    kernels_parser = suites.add_parser("kernels", help="fused RoPE, SwiGLU and LayerNorm against the alternatives")
    args_module = _kernels_module()
    args_module.add_arguments(kernels_parser)
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.endswith((".csv", ".json")):
        parser.error(f"--out {args.out}: use a .csv or .json file name")
    return args_module.run(args)


def _kernels_module():
    # Without a GPU the kernels run through Triton's interpreter, which must be on before triton is imported.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from megaolmo.bench import kernels

    return kernels


if __name__ == "__main__":
    sys.exit(main())
