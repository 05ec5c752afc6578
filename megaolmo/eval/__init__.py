"""Offline and in-loop evaluation: Paloma's perplexity and OLMo's zero-shot downstream suite.

    python -m megaolmo.eval perplexity CKPT DOLMA... --tokenizer TOKENIZER.json [--tp N --pp N]
    python -m megaolmo.eval downstream CKPT TASK...  --tokenizer TOKENIZER.json [--tp N --pp N]

From Python (the training loop, a notebook), with any `model(ids) -> logits`, or a model sharded over
TP x PP x DP through a `scorer` (megaolmo.eval.sharded):

    score_documents(model, tokenizer, documents, convention="paloma", scorer=None)  per domain / source / overall
    evaluate_tasks(model, tokenizer, load_tasks(paths), normalization=None)   accuracy per task and the average
"""

from megaolmo.errors import EvalError
from megaolmo.eval.downstream import evaluate_tasks, score_examples
from megaolmo.eval.perplexity import score_documents, sliding_windows
from megaolmo.eval.tasks import Example, Task, load_task, load_tasks

__all__ = [
    "EvalError",
    "Example",
    "Task",
    "evaluate_tasks",
    "load_task",
    "load_tasks",
    "score_documents",
    "score_examples",
    "sliding_windows",
]
