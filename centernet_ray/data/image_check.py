"""Whether bytes decode as an image at all: the quick check the ingest and ``data check`` run, with
Pillow only. No torch: the ingest's read tasks each start a Ray worker process, and importing torch
there cost ~1.7 s of CPU a process (12 s of the demo's ingest on a 2-core AVX2 VM, BENCHMARKS.md)."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from centernet_ray import storage


def check_image(data: bytes) -> str | None:
    """None when ``data`` decodes as an image, else the reason. JPEGs decode at 1/8 scale (draft
    mode), enough to catch truncation and corruption at a fraction of a full decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return None
    except UnidentifiedImageError:  # its message names Pillow's stream object, not the file
        return f"UnidentifiedImageError: {len(data)} bytes in no format Pillow reads"
    except Exception as exc:  # Pillow raises many types for bad bytes; all mean "unreadable"
        return f"{type(exc).__name__}: {exc}"


def read_checked_image(uri: str) -> tuple[bytes | None, str | None]:
    """(its bytes, None), or (None, the problem) for an image that is missing or does not decode
    (``check_image``). Any other failure to read (object storage timing out, a permission) raises
    its ``OSError``: a caller that dropped the image would hide a problem of the storage."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        return None, f"missing: {exc}"
    problem = check_image(data)
    return (None, problem) if problem else (data, None)
