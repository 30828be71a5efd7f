"""The one exception type for mistakes in what the user gave us.

A :class:`UserInputError` (a bad config, a missing or foreign file, an unusable dataset, a wrong
argument) is reported by the CLI as its message alone, with exit status 2: the message says what to
change. Every other exception is a fault of the program or its environment and keeps its traceback.
It derives from ``ValueError``, so callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Something the user gave is wrong; the message says what and how to fix it."""
