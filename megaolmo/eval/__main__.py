"""python -m megaolmo.eval: perplexity per source and domain, and zero-shot downstream accuracy, of a checkpoint.

    python -m megaolmo.eval perplexity CKPT DOLMA... --tokenizer TOKENIZER.json [--max-length N] [--convention NAME]
    python -m megaolmo.eval downstream CKPT TASK...  --tokenizer TOKENIZER.json [--normalization NAME]

CKPT is any megaolmo checkpoint (consolidated, or a sharded training checkpoint of any layout). Both
print a table and, with --out FILE, write the results as JSON. Under torchrun every rank loads the
model and scores its share of the documents or examples (data parallel); with --tp N, --pp N and/or --cp N
the model is instead sharded over N-rank groups as in training (megaolmo.eval.sharded), the remaining ranks
data parallel, so a model too big for one GPU is evaluated (and with --cp, a context too long for one). A bad input stops with one `error:` line and
exit code 2, and writes nothing; inputs are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from megaolmo.data import iter_documents, load_tokenizer
from megaolmo.data.dolma import dolma_files
from megaolmo.data.tokenizer import eos_id, vocab_size
from megaolmo.errors import EvalError, MegaolmoError, report
from megaolmo.eval.downstream import UNCONDITIONAL_PROMPT, evaluate_tasks
from megaolmo.eval.perplexity import CONVENTIONS, score_documents
from megaolmo.eval.report import check_out, downstream_table, perplexity_table, write_json
from megaolmo.eval.runtime import DTYPES, choose_device, choose_dtype, load_model, rank_and_world, start
from megaolmo.eval.scoring import Scorer
from megaolmo.eval.sharded import load_sharded_model, parallel_scorer
from megaolmo.eval.tasks import NORMALIZATIONS, load_tasks
from megaolmo.parallel.launch import shutdown


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_common(sub: argparse.ArgumentParser, batch_size: int) -> None:
    """The options both commands take."""
    sub.add_argument("--tokenizer", required=True, help="the Hugging Face tokenizer.json the model was trained with")
    sub.add_argument("--max-length", type=positive, help="context window (default: the model's)")
    sub.add_argument("--batch-size", type=positive, default=batch_size, help=f"rows per forward pass ({batch_size})")
    sub.add_argument("--device", help="cpu, cuda or cuda:N (default: this rank's GPU if any, else cpu)")
    sub.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    sub.add_argument("--tp", type=positive, default=1, help="tensor-parallel degree: shard the model over N ranks")
    sub.add_argument("--pp", type=positive, default=1, help="pipeline-parallel degree: split the layers over N ranks")
    sub.add_argument("--cp", type=positive, default=1, help="context-parallel degree: split each row over N ranks")
    sub.add_argument("--out", help="write the results here as JSON")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megaolmo.eval", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ppl = commands.add_parser("perplexity", help="loss, perplexity and bits per byte of Dolma documents per source")
    ppl.add_argument("checkpoint", metavar="CKPT", help="a megaolmo checkpoint directory")
    ppl.add_argument("paths", nargs="+", metavar="DOLMA", help="*.jsonl, *.jsonl.gz, *.json.gz files or directories")
    ppl.add_argument(
        "--convention",
        choices=CONVENTIONS,
        default="paloma",
        help="paloma: EOS + text, every text token predicted in lm-eval's rolling windows (Paloma's own code); "
        "olmo-in-loop: text + EOS in disjoint chunks whose first token is context (OLMo's in-loop evaluator)",
    )
    ppl.add_argument(
        "--stride",
        type=positive,
        help="paloma only: tokens each window after the first predicts (default: --max-length, Paloma's disjoint "
        "windows); smaller gives every token more context, at more forward passes",
    )
    ppl.add_argument("--domains", action="store_true", help="also print every domain's line (always in --out)")
    ppl.add_argument("--per-document", action="store_true", help="also write each document's numbers to --out")
    add_common(ppl, batch_size=8)
    down = commands.add_parser("downstream", help="rank-classification accuracy on multiple-choice tasks")
    down.add_argument("checkpoint", metavar="CKPT", help="a megaolmo checkpoint directory")
    down.add_argument("tasks", nargs="+", metavar="TASK", help="<task>.jsonl(.gz) files or OLMo task directories")
    down.add_argument("--normalization", choices=NORMALIZATIONS, help="for every task (default: OLMo's per task)")
    down.add_argument("--unconditional-prompt", default=UNCONDITIONAL_PROMPT, help="context of 'unconditional'")
    down.add_argument("--limit", type=positive, help="only the first N examples of each task")
    down.add_argument("--per-example", action="store_true", help="also write each example's scores to --out")
    add_common(down, batch_size=32)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check every input, load the model, evaluate; print and write on rank 0. Returns the results."""
    out = check_out(args.out)
    tokenizer = load_tokenizer(args.tokenizer)
    files = dolma_files(args.paths) if args.command == "perplexity" else None
    tasks = load_tasks(args.tasks, args.limit) if args.command == "downstream" else None
    device = choose_device(args.device)
    dtype = choose_dtype(args.dtype, device)
    start(device)
    scorer: Scorer | None = None  # with a sharded model, every rank scores every row through it
    if args.tp * args.pp * args.cp > 1:
        degrees = {"tp": args.tp, "pp": args.pp, "cp": args.cp}
        model = load_sharded_model(args.checkpoint, **degrees, device=device, dtype=dtype)
        scorer = parallel_scorer(model, args.batch_size, eos_id(tokenizer))
    else:
        model = load_model(args.checkpoint, device, dtype)
    if vocab_size(tokenizer) > model.config.vocab_size:
        raise EvalError(
            f"tokenizer {args.tokenizer} has {vocab_size(tokenizer)} ids but the model's vocab is "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained with"
        )
    rank, world = rank_and_world()
    common = {"device": device, "batch_size": args.batch_size, "progress": not args.no_progress, "scorer": scorer}
    if files is not None:
        options = {**common, "per_document": args.per_document, "convention": args.convention}
        results = score_documents(
            model, tokenizer, iter_documents(files), max_length=args.max_length, stride=args.stride, **options
        )
        if results["overall"]["documents"] == 0:
            raise EvalError(f"no documents in {', '.join(map(str, files))}")
        table = perplexity_table(results, domains=args.domains)
    else:
        options = {**common, "per_example": args.per_example, "max_length": args.max_length}
        options.update(normalization=args.normalization, unconditional_prompt=args.unconditional_prompt)
        results = evaluate_tasks(model, tokenizer, tasks, **options)
        table = downstream_table(results)
    header = {"command": args.command, "checkpoint": str(args.checkpoint), "tokenizer": str(args.tokenizer)}
    layout = {"tp": args.tp, "pp": args.pp, "cp": args.cp, "dp": world // (args.tp * args.pp * args.cp)}
    results = {**header, "dtype": str(dtype).removeprefix("torch."), "world_size": world, "layout": layout, **results}
    if rank == 0:
        print(table)
        if out is not None:
            write_json(out, results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    clean = False
    try:
        run(args)
        clean = True
    except MegaolmoError as err:
        return report(err)
    finally:
        shutdown(clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
