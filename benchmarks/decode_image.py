"""What ``decode_image`` costs beyond Pillow's own decode: the EXIF orientation, the 16-bit check,
the error mapping and the channels-last tensor.

    python -m benchmarks.decode_image [--images 40]

Baseline, in the same run: ``Image.open(...).convert("RGB")`` and the same tensor, nothing else.
The images are 640x480 JPEGs of noise (quality 90), the preprocessing benchmark's size, the
hardest case for the JPEG decoder; each candidate decodes all of them per call.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch
from PIL import Image

from benchmarks.timing import compare, cpu_kind, report
from centernet_ray.data.images import decode_image


def pillow_only(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = []
    for _ in range(args.images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    assert all(torch.equal(decode_image(data), pillow_only(data)) for data in images[:3])  # the same pixels
    seconds = compare({"Pillow open + convert": lambda: [pillow_only(data) for data in images],
                       "decode_image": lambda: [decode_image(data) for data in images]}, repeats=7)
    report(f"{args.images} JPEGs of 640x480 per call, CPU {cpu_kind()}", seconds, "Pillow open + convert")


if __name__ == "__main__":
    main()
