"""The one error type of the data pipeline.

A `ValueError` subclass so callers that already catch bad values keep working; the message is
always one line that names the bad value and says how to fix it, so a CLI can print it as is.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input (missing file, malformed document, incompatible tokenizer, too little data)."""
