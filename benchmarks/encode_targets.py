"""encode_targets vs a per-object loop that recomputes each Gaussian kernel; bytes per sample.

    python -m benchmarks.encode_targets [--images 300]
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.timing import compare, report
from centernet_ray.targets import encode_targets, gaussian_radius


def naive_encode(boxes: np.ndarray, classes: np.ndarray, num_classes: int, output_size: tuple[int, int],
                 max_objects: int = 128, min_overlap: float = 0.7) -> dict[str, np.ndarray]:
    """Straightforward version (as the official code does): build every object's kernel from
    scratch with numpy, then max-merge its clipped window into the heatmap."""
    height, width = output_size
    heatmap = np.zeros((num_classes, height, width), dtype=np.float32)
    index = np.zeros(max_objects, dtype=np.int64)
    mask = np.zeros(max_objects, dtype=np.uint8)
    size = np.zeros((max_objects, 2), dtype=np.float32)
    offset = np.zeros((max_objects, 2), dtype=np.float32)
    for k, (box, cls) in enumerate(zip(boxes[:max_objects], classes[:max_objects])):
        x1, y1 = max(box[0], 0), max(box[1], 0)
        x2, y2 = min(box[2], width - 1), min(box[3], height - 1)
        w, h = x2 - x1, y2 - y1
        if w <= 0 or h <= 0:
            continue
        r = max(0, int(gaussian_radius(h, w, min_overlap)))
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        ix, iy = int(cx), int(cy)
        sigma = (2 * r + 1) / 6
        yy, xx = np.ogrid[-r:r + 1, -r:r + 1]
        kernel = np.exp(-(xx * xx + yy * yy) / (2 * sigma * sigma))
        kernel[kernel < np.finfo(np.float64).eps * kernel.max()] = 0
        left, right, top, bottom = min(ix, r), min(width - ix, r + 1), min(iy, r), min(height - iy, r + 1)
        window = heatmap[cls, iy - top:iy + bottom, ix - left:ix + right]
        np.maximum(window, kernel[r - top:r + bottom, r - left:r + right], out=window)
        index[k], mask[k], size[k], offset[k] = iy * width + ix, 1, (w, h), (cx - ix, cy - iy)
    return {"heatmap": heatmap, "index": index, "mask": mask, "size": size, "offset": offset}


def sample_boxes(rng: np.random.Generator, count: int, side: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    wh = np.exp(rng.uniform(np.log(2), np.log(side / 2), size=(count, 2)))
    xy = rng.uniform(0, side - wh)
    return np.concatenate([xy, xy + wh], 1), rng.integers(0, classes, count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--size", type=int, default=128, help="output map side (512 input / stride 4)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [sample_boxes(rng, int(rng.integers(1, 16)), args.size, args.classes) for _ in range(args.images)]
    output = (args.size, args.size)

    for boxes, classes in images[:20]:
        ours, naive = encode_targets(boxes, classes, args.classes, output), naive_encode(boxes, classes, args.classes, output)
        for key in naive:
            np.testing.assert_allclose(ours[key], naive[key], rtol=1e-6, atol=1e-7)
    print(f"encode_targets: {args.images} images, 1-15 objects each, {args.classes} classes, {args.size}x{args.size} map "
          "(outputs checked equal on 20 images)")
    seconds = compare({
        "per-object kernel loop": lambda: [naive_encode(b, c, args.classes, output) for b, c in images],
        "centernet_ray.encode_targets": lambda: [encode_targets(b, c, args.classes, output) for b, c in images],
    }, repeats=3, warmup=1)
    report("all images", seconds, baseline="per-object kernel loop")
    for name, value in seconds.items():
        print(f"  {name:<34} {args.images / value:10.0f} images/s")

    out = encode_targets(*images[0], args.classes, output)
    regression = sum(out[k].nbytes for k in ("index", "mask", "size", "offset"))
    heat = out["heatmap"]
    print(f"\nbytes per sample ({args.classes} classes, {args.size}x{args.size}, max_objects=128; excluding the image):")
    print(f"  heatmap float32 {heat.nbytes:>10,d} + regression {regression:,d}")
    print(f"  heatmap float16 {heat.astype(np.float16).nbytes:>10,d} + regression {regression:,d}")
    print(f"  sparse (boxes + classes, heatmap rendered on the train worker): {128 * 4 * 4 + 128 * 8:,d} (fixed, padded to 128 objects)")
    print(f"  float16 rounding error of the heatmap: max {np.abs(heat.astype(np.float16).astype(np.float32) - heat).max():.1e}")


if __name__ == "__main__":
    main()
