"""The one error type of evaluation.

A `ValueError` subclass, like the data pipeline's `DataError`, whose message is one line naming the bad
input and the fix, so `python -m megaolmo.eval` can print it as `error: ...` and exit 2.
"""

from __future__ import annotations


class EvalError(ValueError):
    """Bad evaluation input: a malformed task file, a window that does not fit the model, a bad option."""
