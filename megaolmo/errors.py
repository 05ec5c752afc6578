"""Every error that a user's input causes: a bad config, data, checkpoint, conversion or evaluation input.

Each message is one line that names the bad value and says how to fix it, so every entry point
(`python -m megaolmo.train | eval | plan | convert | bench`) catches `MegaolmoError` alone and prints
`error: <message>` with exit code 2. Anything else that escapes is a bug in megaolmo and keeps its
traceback. The classes subclass `ValueError` so that callers which already catch bad values keep working.
"""

from __future__ import annotations

import sys

USAGE_EXIT_CODE = 2  # what argparse exits with for a bad command line; megaolmo uses it for any bad input


class MegaolmoError(ValueError):
    """Bad input to megaolmo; the message is one line naming the value at fault and the fix."""


class ConfigError(MegaolmoError):
    """A configuration value (or launch layout) that megaolmo cannot run with."""


class WorldSizeError(ConfigError):
    """The launched ranks do not match the parallel degrees; `needed` is the world size that would."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


class DataError(MegaolmoError):
    """Bad data input: a missing file, a malformed document, an incompatible tokenizer, too little data."""


class CheckpointError(MegaolmoError):
    """A checkpoint that cannot be read or written; the message names the path and the fix."""


class ConversionError(CheckpointError):
    """A Hugging Face or allenai/OLMo input that cannot be converted; names the file or value at fault."""


class EvalError(MegaolmoError):
    """Bad evaluation input: a malformed task file, a window that does not fit the model, a bad option."""


def report(err: MegaolmoError) -> int:
    """Print `err` as the one `error:` line an entry point ends with; returns the exit code to use."""
    print("error: " + " ".join(str(err).split()), file=sys.stderr)
    return USAGE_EXIT_CODE
