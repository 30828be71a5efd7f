"""encode_targets vs a per-object loop that recomputes each Gaussian kernel; bytes per sample; the
training process's cost of targets when the collate renders them (CPU training) vs when it hands
the sparse boxes to the device and the engine renders them there (accelerator training).

    python -m benchmarks.encode_targets [--images 200] [--classes 80] [--size 128] [--batch 32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

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
    parser.add_argument("--batch", type=int, default=32, help="images per training batch (collate section)")
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
    collate_section(images, args.classes, args.size, args.batch)


def collate_section(images: list, num_classes: int, side: int, batch: int, max_objects: int = 128) -> None:
    """CPU time per image the training process spends on targets, and bytes per image it moves to
    the device, with the dense collate (before) and the sparse one (after: the device renders)."""
    from centernet_ray.config import load_config
    from centernet_ray.targets import TargetCollate, render_targets

    torch.set_num_threads(1)
    config = load_config(None, [f"data.input_size=[{side * 4},{side * 4}]", f"targets.max_objects={max_objects}"])
    rows = {"image": np.zeros((batch, 3, side * 4, side * 4), np.uint8),
            "boxes": np.zeros((batch, max_objects, 4), np.float32), "classes": np.zeros((batch, max_objects), np.int32),
            "num_boxes": np.zeros(batch, np.int32), "image_id": np.arange(batch),
            "input_to_original": np.zeros((batch, 2, 3), np.float32), "original_size": np.ones((batch, 2), np.int32)}
    for b, (boxes, classes) in enumerate(images[:batch]):
        rows["boxes"][b, :len(boxes)], rows["classes"][b, :len(boxes)], rows["num_boxes"][b] = boxes, classes, len(boxes)

    def cpu_ms_per_image(function, repeats: int = 5) -> float:
        function()
        start = time.process_time()
        for _ in range(repeats):
            function()
        return (time.process_time() - start) / repeats / batch * 1e3

    def device_bytes(out: dict) -> float:
        tensors = [out["image"], *(out["targets"].values() if "targets" in out else
                                   (out[k] for k in ("boxes", "classes", "num_boxes")))]
        return sum(t.numel() * t.element_size() for t in tensors) / batch

    dense, sparse = TargetCollate(config, num_classes), TargetCollate(config, num_classes, render=False)
    sparse_out = sparse(rows)
    targets_only = {  # the collate's work on targets alone (the rest copies the image and ids, the same in both)
        "before": lambda: render_targets(rows["boxes"], rows["classes"], rows["num_boxes"], num_classes, (side, side),
                                         max_objects),
        "after": lambda: [torch.tensor(rows[k]) for k in ("boxes", "classes", "num_boxes")]}
    print(f"\nthe training process, batch {batch} at {side * 4}x{side * 4} ({num_classes} classes, {side}x{side} map, "
          f"max_objects {max_objects}; one thread; target <= 0.1 ms/img on targets):")
    print(f"  {'':<44}{'CPU ms/img, targets':>21}{'CPU ms/img, collate':>21}{'bytes/img to device':>21}")
    for (name, collate), part in zip((("before: the collate renders (TargetCollate)", dense),
                                      ("after: sparse boxes, rendered on the device", sparse)), targets_only.values()):
        print(f"  {name:<44}{cpu_ms_per_image(part):>21.3f}{cpu_ms_per_image(lambda: collate(rows)):>21.3f}"
              f"{device_bytes(collate(rows)):>21,.0f}")
    render = {method: cpu_ms_per_image(lambda m=method: render_targets(
        sparse_out["boxes"], sparse_out["classes"], sparse_out["num_boxes"], num_classes, (side, side), max_objects,
        method=m), repeats=2) for method in ("loop", "vectorised")}
    print(f"  the device's rendering, here on this CPU: per-image loop {render['loop']:.2f} ms/img, vectorised "
          f"{render['vectorised']:.2f} ms/img (the vectorised form is for accelerators; GPU figure: benchmarks/gpu_check.py)")


if __name__ == "__main__":
    main()
