"""The one exception type for mistakes in what the user gave us, and reading errors of other processes for them.

A :class:`UserInputError` (a bad config, a missing or foreign file, an unusable dataset, a wrong
argument) is reported by the CLI as its message alone, with exit status 2: the message says what to
change. Every other exception is a fault of the program or its environment and keeps its traceback.
It derives from ``ValueError``, so callers that catch ``ValueError`` keep working.

An error raised in another process reaches the driver as text (a Tune trial's, a Serve replica's) or
as Ray Train's error of its workers: ``error_message`` finds the line that says what failed,
``user_error_text`` whether that line is a ``UserInputError``, to be reported as one, and
``worker_user_error`` the ``UserInputError`` a training worker raised.
"""

from __future__ import annotations

import builtins
import re
import sys


class UserInputError(ValueError):
    """Something the user gave is wrong; the message says what and how to fix it."""


# An exception as a traceback's last line prints it: a dotted class name (Ray's wrappers add their
# cause in parentheses), then the message, if any, after a colon.
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b(?:\([\w.]*\))?(?::.*)?")
_RANK_SNIPPET = re.compile(r"^\[Rank [\d,]+ Error Snippet\]:$", re.MULTILINE)


def error_message(error: str) -> str:
    """The line of an error from another process that says what failed (``error``: its whole text,
    such as ``str`` of a failed Tune trial's error or the message of a Serve replica that could not start):
    Ray's out-of-memory kill when it was one; else, when Ray Train lists its ranks' errors (rank
    order, the first failure usually first), the first rank's exception; else the last exception
    line (a wrapper's traceback ends with its cause's); else the last line."""
    lines = [line.rstrip() for line in error.splitlines() if line.strip()]
    out_of_memory = next((line for line in lines if "running low on memory" in line), None)
    if out_of_memory:
        return out_of_memory.strip()
    snippets = _RANK_SNIPPET.split(error)
    scope = snippets[1] if len(snippets) > 1 else error
    exceptions = [line for line in scope.splitlines() if _EXCEPTION_LINE.fullmatch(line.rstrip())]
    if exceptions:
        return exceptions[-1].rstrip()
    return lines[-1].strip() if lines else "no error recorded"


def user_error_text(line: str) -> str | None:
    """The message of an exception line (``error_message``'s) that names a ``UserInputError`` (or a
    subclass: ``ConfigError``, ...) or a ``FileNotFoundError``; None for any other exception."""
    match = re.fullmatch(r"([A-Za-z_][\w.]*): (.+)", line.strip())
    if not match:
        return None
    name, message = match.groups()
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        found = getattr(builtins, class_name, None)
    else:  # a module already imported here (the project's errors are): nothing is imported for a name
        found = getattr(sys.modules.get(module_name), class_name, None)
    is_user_error = isinstance(found, type) and issubclass(found, (UserInputError, FileNotFoundError))
    return message if is_user_error else None


def worker_user_error(error: BaseException) -> UserInputError | None:
    """The ``UserInputError`` a training worker raised (the lowest rank's), when that is why a Ray
    Train run failed (its ``WorkerGroupError`` keeps each rank's exception in ``worker_failures``):
    the CLI then says it in one line, as when the driver raises it, not inside Ray Train's error
    with every rank's traceback, truncated."""
    failures = getattr(error, "worker_failures", None) or {}
    return next((failures[rank] for rank in sorted(failures) if isinstance(failures[rank], UserInputError)), None)
