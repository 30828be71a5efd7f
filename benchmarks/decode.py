"""Decode on [B, 80, 128, 128] heatmaps: centernet_ray.decode vs plain max-pool whole map + top-K.

    python -m benchmarks.decode [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.timing import compare, report
from centernet_ray.decode import decode


def plain_decode(heat: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, k: int = 100):
    """The straightforward formulation: max_pool2d over the whole map, keep maxima, top-K, gather."""
    batch, _, height, width = heat.shape
    keep = F.max_pool2d(heat, 3, stride=1, padding=1) == heat
    scores, flat = (heat * keep).view(batch, -1).topk(k)
    classes, pixel = flat // (height * width), flat % (height * width)
    ys, xs = (pixel // width).float(), (pixel % width).float()
    wh = size.view(batch, 2, -1).gather(2, pixel.unsqueeze(1).expand(-1, 2, -1))
    off = offset.view(batch, 2, -1).gather(2, pixel.unsqueeze(1).expand(-1, 2, -1))
    cx, cy = xs + off[:, 0], ys + off[:, 1]
    boxes = torch.stack([cx - wh[:, 0] / 2, cy - wh[:, 1] / 2, cx + wh[:, 0] / 2, cy + wh[:, 1] / 2], 2)
    return boxes, scores, classes


def same_detections(ours, base) -> bool:
    """Equal scores, and the same (class, box) set per image; the order among equal scores is free
    (float32 uniform noise has tied values among its top 100)."""
    if not torch.equal(ours[1], base[1]):
        return False
    for b in range(ours[0].shape[0]):
        mine = sorted(zip(ours[2][b].tolist(), ours[0][b].tolist()))
        theirs = sorted(zip(base[2][b].tolist(), base[0][b].tolist()))
        if mine != theirs:
            return False
    return True


def realistic_heatmap(batch: int, classes: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Low background noise plus a few dozen Gaussian blobs per image, like a trained model's output."""
    heat = torch.rand(batch, classes, size, size, generator=gen) * 0.05
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for b in range(batch):
        for _ in range(30):
            c = int(torch.randint(classes, (1,), generator=gen))
            cy, cx = torch.randint(size, (2,), generator=gen).tolist()
            sigma = 1 + 4 * float(torch.rand((), generator=gen))
            blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2)) * float(torch.rand((), generator=gen))
            heat[b, c] = torch.maximum(heat[b, c], blob)
    return heat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"decode, K=100, heatmap [B, {args.classes}, {args.size}, {args.size}] ({torch.get_num_threads()} threads)")
    for batch in (1, 16):
        for name, heat in (("uniform noise", torch.rand(batch, args.classes, args.size, args.size, generator=gen)),
                           ("blobs + noise", realistic_heatmap(batch, args.classes, args.size, gen))):
            size = torch.rand(batch, 2, args.size, args.size, generator=gen) * 20
            offset = torch.rand(batch, 2, args.size, args.size, generator=gen)
            identical = same_detections(decode(heat, size, offset), plain_decode(heat, size, offset))
            seconds = compare({"plain max-pool + top-K": lambda: plain_decode(heat, size, offset),
                               "centernet_ray.decode": lambda: decode(heat, size, offset)},
                              repeats=args.repeats if batch == 1 else max(3, args.repeats // 4))
            report(f"batch {batch}, {name}: identical top-K boxes/scores/classes = {identical}",
                   seconds, baseline="plain max-pool + top-K")


if __name__ == "__main__":
    main()
