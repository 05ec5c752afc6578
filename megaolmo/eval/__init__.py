"""Offline and in-loop evaluation: Paloma-style perplexity and OLMo's zero-shot downstream suite.

    python -m megaolmo.eval perplexity CKPT DOLMA... --tokenizer TOKENIZER.json
    python -m megaolmo.eval downstream CKPT TASK...  --tokenizer TOKENIZER.json

From Python (the training loop, a notebook), with any `model(ids) -> logits`:

    score_documents(model, tokenizer, documents, max_length=, stride=, device=)  per-group loss / perplexity / bpb
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
