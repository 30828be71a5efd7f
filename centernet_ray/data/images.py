"""Image decoding with Pillow: any mode and format it reads becomes an RGB uint8 tensor. (Whether
bytes decode at all, without torch, is ``image_check``.)"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from centernet_ray.errors import UserInputError

# Pillow's modes of 16-bit and 32-bit integer pixels: ``convert("RGB")`` clips them at 255 (a 16-bit
# grey ramp comes out nearly all white), so they are scaled to 8 bits first.
WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(UserInputError):
    """The bytes are not a readable image (corrupt, truncated, unknown format, or too large)."""


def decode_image(data: bytes | str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """Decode image bytes (or a file) to uint8 [3, H, W] RGB, upright.

    The EXIF orientation is applied (as OpenCV's ``imread`` in the official CenterNet does), grey
    and palette images become RGB, alpha is dropped, and 16-bit grey is scaled to 8 bits.
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
                ImageOps.exif_transpose(image, in_place=True)  # not in place, it copies every image
                rgb = _to_rgb(image)
        except ImageDecodeError:
            raise
        except UnidentifiedImageError as exc:  # its message names PIL's stream object, not the input
            what = f"{len(data)} bytes" if isinstance(source, io.BytesIO) else str(data)
            raise ImageDecodeError(f"not a readable image: {what} in no format PIL reads "
                                   "(JPEG, PNG, WebP, BMP, TIFF, ...)") from exc
        except Exception as exc:  # noqa: BLE001 - Pillow's format plugins raise anything (OSError,
            # SyntaxError, EOFError, NotImplementedError, struct.error, ...) on bytes they cannot parse
            raise ImageDecodeError(f"not a readable image: {type(exc).__name__}: {exc}") from exc
    # A channels-last view of the HWC pixels: torch resizes uint8 channels-last images fastest.
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` (any mode, loaded here) as 8-bit RGB."""
    image.load()
    if image.mode in WIDE_INTEGER_MODES:
        pixels = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(pixels, 0, 65535) // 257).astype(np.uint8), mode="L")
    return image.convert("RGB")
