"""Output a person can read anywhere: plain text when stdout is not a terminal.

Logs that go to a file, ``ray job logs`` or ``kubectl logs`` must not carry what only a terminal
understands: colour codes, cursor movements (a progress bar redrawn with ``ESC[A``), carriage
returns that overwrite a line. On a terminal nothing changes.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, TextIO

# CSI (colours, cursor moves), OSC (titles, links) and the two-character escapes.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def plain(text: str) -> str:
    """``text`` without terminal control sequences."""
    return _ESCAPES.sub("", text)


class PlainTextStream:
    """A text stream that writes plain text to ``stream``: no control sequences, and a line that
    is redrawn with carriage returns (a progress bar) is written once, as it stands when it ends,
    the way a terminal would have shown it last. Everything else is the stream's."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._held: str | None = None  # a line being redrawn, until its newline

    def write(self, text: str) -> int:
        for piece in plain(text).splitlines(keepends=True):
            if self._held is None and "\r" not in piece:
                self._stream.write(piece)
                continue
            self._held = (self._held or "") + piece
            if self._held.endswith("\n"):
                self._stream.write(self._held[:-1].rstrip("\r").rsplit("\r", 1)[-1] + "\n")
                self._held = None
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:  # flush, fileno, encoding, ...
        return getattr(self._stream, name)


def is_terminal() -> bool:
    """Whether stdout is an interactive terminal."""
    return sys.stdout.isatty()


def plain_output_unless_terminal() -> bool:
    """When stdout is not a terminal: strip terminal control sequences from everything this process
    prints to stdout and stderr (Ray's forwarded worker lines included) and ask Ray not to colour
    its log prefixes. Returns whether output is plain. Call it before logging is configured."""
    if is_terminal():
        return False
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read by the driver's printer of worker logs
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, PlainTextStream):
            setattr(sys, name, PlainTextStream(stream))
    return True
