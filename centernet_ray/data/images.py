"""Image decoding with Pillow: any mode and format it reads becomes an RGB uint8 tensor."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from centernet_ray.errors import UserInputError


class ImageDecodeError(UserInputError):
    """The bytes are not a readable image (corrupt, truncated, unknown format, or too large)."""


def decode_image(data: bytes | str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """Decode image bytes (or a file) to uint8 [3, H, W] RGB.

    Grayscale, palette and alpha images are converted to RGB (alpha is dropped).
    ``max_pixels`` rejects images whose declared size exceeds it before decoding any pixels
    (decompression bombs).
    """
    try:
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else open(data, "rb")
    except OSError as exc:
        raise ImageDecodeError(f"cannot open image {data}: {exc}") from exc
    with source:
        try:
            with Image.open(source) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels}")
                image.load()
                rgb = image.convert("RGB")
        except ImageDecodeError:
            raise
        except UnidentifiedImageError as exc:  # its message names PIL's stream object, not the input
            what = f"{len(data)} bytes" if isinstance(source, io.BytesIO) else str(data)
            raise ImageDecodeError(f"not a readable image: {what} in no format PIL reads "
                                   "(JPEG, PNG, WebP, BMP, TIFF, ...)") from exc
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageDecodeError(f"not a readable image: {exc}") from exc
    # A channels-last view of the HWC pixels: torch resizes uint8 channels-last images fastest.
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
