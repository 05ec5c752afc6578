"""python -m megaolmo.bench kernels | step | suite [options]."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from megaolmo.errors import MegaolmoError, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megaolmo.bench")
    suites = parser.add_subparsers(dest="suite", required=True)
    kernels_parser = suites.add_parser(
        "kernels", help="fused RoPE, SwiGLU, LayerNorm and RMSNorm against the alternatives"
    )
    kernels = _kernels_module()
    kernels.add_arguments(kernels_parser)
    kernels_parser.set_defaults(run=kernels.run)
    step_parser = suites.add_parser("step", help="a training step per linear backend, and transformers' OLMo")
    from megaolmo.bench import step

    step.add_arguments(step_parser)
    step_parser.set_defaults(run=step.run)
    suite_parser = suites.add_parser("suite", help="every part above plus pytest -m gpu and a short training run")
    from megaolmo.bench import suite

    suite.add_arguments(suite_parser)
    suite_parser.set_defaults(run=suite.run)
    args = parser.parse_args(argv)
    if args.suite != "suite" and args.out is not None and not args.out.endswith((".csv", ".json")):
        parser.error(f"--out {args.out}: use a .csv or .json file name")  # the suite's --out is a folder
    try:
        return args.run(args)
    except MegaolmoError as err:  # e.g. --model naming no preset, a layout the ranks do not fit
        return report(err)


def _kernels_module():
    # Without a GPU the kernels run through Triton's interpreter, which must be on before triton is imported.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from megaolmo.bench import kernels

    return kernels


if __name__ == "__main__":
    sys.exit(main())
