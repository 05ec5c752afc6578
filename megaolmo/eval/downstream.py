"""Zero-shot rank classification, OLMo's way: score every choice as a continuation, pick the best.

A choice's score is the summed log-probability of its continuation tokens after its context, under one
of OLMo's normalizations:

    none           sum                                        (oe-eval acc_raw, OLMo in-loop "acc")
    per-token      sum / continuation tokens
    per-character  sum / continuation characters              (oe-eval acc_per_char, in-loop "len_norm")
    unconditional  sum - sum of the continuation after the     (oe-eval acc_uncond; OLMo's in-loop
                   unconditional prompt ("Answer:")            "pmi_dc" divides the two sums instead)

Characters are counted without the one leading space that separates a continuation from its context,
as OLMo (`len(continuation) - 1`) and lm-eval-harness's acc_norm do. The prediction is the first best
choice; accuracy is per task, and the average is the unweighted mean over tasks (OLMo's "avg").

Context and continuation are encoded separately and concatenated (OLMo's in-loop evaluator does the
same); a context that does not fit is cut from the left, as OLMo does, and an empty one becomes EOS. Each
context is encoded once per task and identical rows (" yes" after "Answer:" for every boolq question)
are scored once. Every normalization's accuracy is reported; the chosen one is "accuracy".
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

from megaolmo.data.tokenizer import eos_id
from megaolmo.errors import EvalError
from megaolmo.eval.runtime import gather, my_share, rank_and_world
from megaolmo.eval.scoring import Model, Row, Scorer, score_rows
from megaolmo.eval.tasks import NORMALIZATIONS, Example, Task

UNCONDITIONAL_PROMPT = "Answer:"


def characters(continuation: str) -> int:
    """The characters a per-character score divides by: the continuation less its separating space."""
    return max(1, len(continuation) - 1 if continuation.startswith(" ") else len(continuation))


def normalize(logprob: float, uncond: float, tokens: int, chars: int, normalization: str) -> float:
    """One choice's score under `normalization` (higher is better)."""
    if normalization == "none":
        return logprob
    if normalization == "per-token":
        return logprob / tokens
    if normalization == "per-character":
        return logprob / chars
    if normalization == "unconditional":
        return logprob - uncond
    raise EvalError(f"normalization {normalization!r} is not one of {', '.join(NORMALIZATIONS)}")


def predict(choices: dict[str, list], normalization: str) -> int:
    """The index of the best choice (the first one on a tie) from an example's scored choices."""
    scores = [
        normalize(lp, un, tok, ch, normalization)
        for lp, un, tok, ch in zip(choices["logprobs"], choices["uncond_logprobs"], choices["tokens"], choices["chars"])
    ]
    return max(range(len(scores)), key=scores.__getitem__)


def choice_row(context: list[int], continuation: list[int], max_length: int) -> Row:
    """The row scoring `continuation` after `context`, the context cut from the left to fit `max_length`."""
    if not continuation:
        raise EvalError("a choice encodes to no tokens; every choice needs text to score")
    if len(continuation) > max_length:
        raise EvalError(f"a choice of {len(continuation)} tokens does not fit max_length {max_length}")
    return Row(tuple((context + continuation)[-(max_length + 1) :]), len(continuation))


class _Encoder:
    """Token ids of texts, each distinct text encoded once (contexts repeat across choices)."""

    def __init__(self, tokenizer: Any) -> None:
        self.eos = eos_id(tokenizer)
        self.encode = lru_cache(maxsize=None)(lambda text: tuple(tokenizer.encode(text, add_special_tokens=False).ids))

    def context(self, text: str) -> list[int]:
        return list(self.encode(text)) or [self.eos]

    def continuation(self, text: str) -> list[int]:
        return list(self.encode(text))


def score_examples(
    model: Model,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    unconditional_prompt: str = UNCONDITIONAL_PROMPT,
    max_length: int = 2048,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "downstream",
    scorer: Scorer | None = None,
) -> list[dict[str, list]]:
    """Per example (in order, gathered over ranks): logprobs, uncond_logprobs, tokens and chars per choice.

    With a `scorer` (e.g. a model sharded over TP x PP x DP, in the training loop) every rank scores every
    example through it, and the scorer splits the work; otherwise ranks share the examples."""
    encoder = _Encoder(tokenizer)
    for example in examples:  # every rank checks every choice, so a bad one stops all ranks alike
        for continuation in example.continuations:
            choice_row([encoder.eos], encoder.continuation(continuation), max_length)
    rows: dict[Row, int] = {}  # identical rows are scored once
    plans = []
    for index, example in my_share(examples) if scorer is None else enumerate(examples):
        plan: dict[str, Any] = {"label": example.label, "cond": [], "uncond": [], "tokens": [], "chars": []}
        uncond_context = encoder.context(example.unconditional or unconditional_prompt)
        for context, continuation in zip(example.contexts, example.continuations):
            ids = encoder.continuation(continuation)
            for kind, ctx in (("cond", encoder.context(context)), ("uncond", uncond_context)):
                plan[kind].append(rows.setdefault(choice_row(ctx, ids, max_length), len(rows)))
            plan["tokens"].append(len(ids))
            plan["chars"].append(characters(continuation))
        plans.append((index, plan))
    show = progress and rank_and_world()[0] == 0
    if scorer is None:
        logprobs = score_rows(
            model, list(rows), device=device, batch_size=batch_size, pad_id=encoder.eos, progress=show, desc=desc
        )
    else:
        logprobs = scorer(list(rows))
    mine = []
    for index, plan in plans:
        scored = {
            "label": plan["label"],
            "logprobs": [logprobs[r] for r in plan["cond"]],
            "uncond_logprobs": [logprobs[r] for r in plan["uncond"]],
            "tokens": plan["tokens"],
            "chars": plan["chars"],
        }
        mine.append((index, scored))
    return gather(mine) if scorer is None else [scored for _, scored in mine]


def evaluate_tasks(
    model: Model,
    tokenizer: Any,
    tasks: Sequence[Task],
    *,
    normalization: str | None = None,
    unconditional_prompt: str = UNCONDITIONAL_PROMPT,
    max_length: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    progress: bool = False,
    per_example: bool = False,
    scorer: Scorer | None = None,
) -> dict[str, Any]:
    """Accuracy of `model` on each task and their average.

    `tasks` come from `megaolmo.eval.tasks.load_tasks`; `normalization` overrides every task's default
    (OLMo's, see tasks.DEFAULT_NORMALIZATION); `max_length` defaults to the model's max_sequence_length.
    Returns {"tasks": {name: {"path", "examples", "normalization", "accuracy", "accuracy_by_normalization",
    ["per_example"]}}, "average": mean accuracy}; with `per_example`, each example's label, prediction and
    per-choice logprobs, uncond_logprobs, tokens and chars.
    """
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise EvalError(f"normalization {normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
    limit = getattr(getattr(model, "config", None), "max_sequence_length", None)
    max_length = max_length or limit
    if not max_length or max_length < 1 or (limit is not None and max_length > limit):
        raise EvalError(f"max_length {max_length} must be between 1 and the model's max_sequence_length {limit}")
    results: dict[str, Any] = {}
    for task in tasks:
        scored = score_examples(
            model,
            tokenizer,
            task.examples,
            unconditional_prompt=unconditional_prompt,
            max_length=max_length,
            device=device,
            batch_size=batch_size,
            progress=progress,
            desc=task.name,
            scorer=scorer,
        )
        chosen = normalization or task.normalization
        by_normalization = {
            norm: sum(predict(ex, norm) == ex["label"] for ex in scored) / len(scored) for norm in NORMALIZATIONS
        }
        results[task.name] = {
            "path": task.path,
            "examples": len(scored),
            "normalization": chosen,
            "accuracy": by_normalization[chosen],
            "accuracy_by_normalization": by_normalization,
        }
        if per_example:
            results[task.name]["per_example"] = [{**ex, "prediction": predict(ex, chosen)} for ex in scored]
    average = sum(r["accuracy"] for r in results.values()) / len(results) if results else float("nan")
    return {"tasks": results, "average": average}
