"""Reading ``torch.save`` files (checkpoints, pretrained weights) from a path or URI, safely.

Always with ``weights_only=True``, so a file from elsewhere cannot run code; a file that is not one
(truncated, another format, pickled objects beyond tensors and plain data) is a ``UserInputError``
naming it, not a traceback from torch's unpickler.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from centernet_ray import storage
from centernet_ray.errors import UserInputError


# What torch's readers say in the RuntimeError of bytes that are no torch.save file (zip reader,
# legacy pickle reader), as opposed to other RuntimeErrors while loading.
READER_FAILURES = ("PytorchStreamReader", "inline_container", "unexpected EOF", "magic number", "zip archive")


def load_torch_file(uri: str | Path, map_location: str | torch.device = "cpu", what: str = "a torch.save file") -> Any:
    """The object ``torch.save`` wrote to ``uri`` (local path or URI), read with ``weights_only=True``;
    ``what`` the file should be, for the error (``"a centernet-ray checkpoint"``)."""
    with storage.open_random_access(uri) as handle:
        try:
            return torch.load(handle, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            detail = _unpickler_error(str(exc))
            if "Unsupported global" in detail:  # weights_only refused an object: loading it could run code
                raise UserInputError(f"{uri} is not {what}: it holds Python objects beyond tensors and plain "
                                     f"data, which are not loaded ({detail})") from None
            raise UserInputError(f"{uri} is not {what}: not a torch.save file ({detail})") from None
        except (RuntimeError, EOFError, KeyError) as exc:  # what torch's zip and legacy readers raise on
            # bytes that are not a torch.save file: a truncated copy, a text file, another archive
            if isinstance(exc, RuntimeError) and not any(sign in str(exc) for sign in READER_FAILURES):
                raise  # not the file's bytes: e.g. the allocator out of memory for a large checkpoint
            first_line = (str(exc).splitlines() or [""])[0]
            raise UserInputError(f"{uri} is not {what}: not a readable torch.save file (truncated, or "
                                 f"another format: {type(exc).__name__}: {first_line}); copy it again") from exc


def _unpickler_error(message: str) -> str:
    """The line of torch's weights-only refusal that says what it refused (a paragraph of advice
    to load with ``weights_only=False`` surrounds it)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            detail = line.split("WeightsUnpickler error:", 1)[1].split(" Please use ")[0].strip()
            return detail or (lines[index + 1] if index + 1 < len(lines) else line)
    return lines[0] if lines else "unpickling failed"
