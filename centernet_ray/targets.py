"""CenterNet training targets, all of them: Gaussian radius, peak kernels, the per-image encoding
(``encode_targets``), a batch of sparse rows rendered dense (``render_targets``) and the collate
that does it on the train worker (``TargetCollate``).

All coordinates here are in OUTPUT-map pixels (input pixels / stride). The math follows
DESIGN.md "The method, precisely".
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from centernet_ray.config import Config

log = logging.getLogger(__name__)

RadiusFormula = Literal["cornernet", "exact"]

# Input pixels per output-map cell: every model's heads run at 1/4 of the input (the official
# ``down_ratio``). Defined here, with the output-map geometry, so that the data layer needs no model.
OUTPUT_STRIDE = 4


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7,
                    formula: RadiusFormula = "cornernet") -> float:
    """Radius of the disc of centre shifts that keep IoU >= ``min_overlap`` with the true box.

    ``height``/``width`` are rounded up to whole pixels. ``cornernet`` reproduces the official
    CenterNet/CornerNet arithmetic (its quadratic roots are not the true ones); ``exact`` solves the
    same three quadratics correctly (as MMDetection does). Returns min(r1, r2, r3).
    """
    if not 0.0 < min_overlap < 1.0:
        raise ValueError(f"min_overlap must be in (0, 1); got {min_overlap}")
    h, w, o = float(math.ceil(height)), float(math.ceil(width)), float(min_overlap)

    # Case 1: both corners shift outwards/inwards so that the box grows.
    a1, b1, c1 = 1.0, h + w, w * h * (1 - o) / (1 + o)
    # Case 2: the predicted box lies inside the true box.
    a2, b2, c2 = 4.0, 2 * (h + w), (1 - o) * w * h
    # Case 3: the predicted box encloses the true box.
    a3, b3, c3 = 4 * o, -2 * o * (h + w), (o - 1) * w * h
    sq1 = math.sqrt(b1 * b1 - 4 * a1 * c1)
    sq2 = math.sqrt(b2 * b2 - 4 * a2 * c2)
    sq3 = math.sqrt(b3 * b3 - 4 * a3 * c3)
    if formula == "cornernet":
        r1, r2, r3 = (b1 + sq1) / 2, (b2 + sq2) / 2, (b3 + sq3) / 2
    elif formula == "exact":
        r1, r2, r3 = (b1 - sq1) / (2 * a1), (b2 - sq2) / (2 * a2), (b3 + sq3) / (2 * a3)
    else:
        raise ValueError(f"formula must be 'cornernet' or 'exact'; got {formula!r}")
    return min(r1, r2, r3)


@functools.lru_cache(maxsize=512)
def gaussian_kernel(radius: int) -> np.ndarray:
    """[2r+1, 2r+1] float32 Gaussian with sigma = (2r+1)/6, peak exactly 1, tails below eps*max zeroed.

    Cached and read-only: every object of the same radius shares one kernel.
    """
    diameter = 2 * radius + 1
    sigma = diameter / 6.0
    grid = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(grid[None, :] ** 2 + grid[:, None] ** 2) / (2 * sigma * sigma))
    kernel[kernel < np.finfo(np.float64).eps * kernel.max()] = 0.0
    kernel = kernel.astype(np.float32)
    kernel.flags.writeable = False
    return kernel


def draw_gaussian(heatmap: np.ndarray, center: tuple[int, int], radius: int) -> None:
    """Max-merge a Gaussian peak into ``heatmap`` [H, W] in place, clipped at the borders.

    ``center`` is the integer (x, y) peak location.
    """
    kernel = gaussian_kernel(radius)
    x, y = center
    height, width = heatmap.shape
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    if left + right <= 0 or top + bottom <= 0:
        return
    region = heatmap[y - top:y + bottom, x - left:x + right]
    patch = kernel[radius - top:radius + bottom, radius - left:radius + right]
    np.maximum(region, patch, out=region)


def encode_targets(boxes: np.ndarray, classes: np.ndarray, num_classes: int,
                   output_size: tuple[int, int], max_objects: int = 128, min_overlap: float = 0.7,
                   formula: RadiusFormula = "cornernet") -> dict[str, np.ndarray | int]:
    """Encode one image's boxes into CenterNet targets.

    Args:
        boxes: float [N, 4] x1, y1, x2, y2 in output-map pixels. Clipped to the map; boxes that are
            empty after clipping or not finite are skipped and counted.
        classes: int [N] contiguous class indices in [0, num_classes).
        output_size: (H, W) of the output map.

    Returns numpy arrays ``heatmap`` [C, H, W] float32, ``index`` [M] int64 (y * W + x),
    ``mask`` [M] uint8 (1 = real object), ``size`` [M, 2] float32 (w, h), ``offset`` [M, 2] float32
    (centre - int(centre)), with M = ``max_objects``; and the counts ``num_objects`` (slots filled),
    ``num_degenerate`` (skipped boxes) and ``num_overflow`` (valid objects beyond ``max_objects``:
    their heatmap peaks are still drawn, so they are not trained as background, but they get no
    size/offset slot).
    """
    height, width = output_size
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if len(boxes) != len(classes):
        raise ValueError(f"boxes [{len(boxes)}, 4] and classes [{len(classes)}] differ in length")
    if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"class indices must be in [0, {num_classes}); got {classes.min()}..{classes.max()}")

    heatmap = np.zeros((num_classes, height, width), dtype=np.float32)
    index = np.zeros(max_objects, dtype=np.int64)
    mask = np.zeros(max_objects, dtype=np.uint8)
    size = np.zeros((max_objects, 2), dtype=np.float32)
    offset = np.zeros((max_objects, 2), dtype=np.float32)

    clipped = boxes.copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, width - 1)
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, height - 1)
    box_w = clipped[:, 2] - clipped[:, 0]
    box_h = clipped[:, 3] - clipped[:, 1]
    valid = np.isfinite(boxes).all(axis=1) & (box_w > 0) & (box_h > 0)

    filled = 0
    for i in np.flatnonzero(valid):
        w, h = box_w[i], box_h[i]
        cx = (clipped[i, 0] + clipped[i, 2]) / 2
        cy = (clipped[i, 1] + clipped[i, 3]) / 2
        ix, iy = int(cx), int(cy)
        radius = max(0, int(gaussian_radius(h, w, min_overlap, formula)))
        draw_gaussian(heatmap[classes[i]], (ix, iy), radius)
        if filled < max_objects:
            index[filled] = iy * width + ix
            mask[filled] = 1
            size[filled] = (w, h)
            offset[filled] = (cx - ix, cy - iy)
            filled += 1

    num_valid = int(valid.sum())
    num_overflow = num_valid - filled
    if num_overflow:
        log.debug("encode_targets: %d objects beyond max_objects=%d get no regression slot",
                  num_overflow, max_objects)
    return {
        "heatmap": heatmap, "index": index, "mask": mask, "size": size, "offset": offset,
        "num_objects": filled, "num_degenerate": int(len(boxes) - num_valid), "num_overflow": num_overflow,
    }


def render_targets(boxes: torch.Tensor | np.ndarray, classes: torch.Tensor | np.ndarray,
                   num_boxes: torch.Tensor | np.ndarray, num_classes: int, output_size: tuple[int, int],
                   max_objects: int, min_overlap: float = 0.7, formula: str = "cornernet") -> dict[str, torch.Tensor]:
    """Dense training targets for a batch of sparse rows, exactly ``encode_targets`` per image.

    Args: boxes [B, M, 4] output-map px, classes [B, M], num_boxes [B].
    Returns: heatmap [B, C, H, W] float32, index [B, M] int64, mask [B, M] uint8,
    size [B, M, 2], offset [B, M, 2] float32.
    """
    boxes, classes, num_boxes = (np.asarray(x) for x in (boxes, classes, num_boxes))
    encoded = [encode_targets(boxes[b, : num_boxes[b]], classes[b, : num_boxes[b]], num_classes, output_size,
                              max_objects, min_overlap, formula) for b in range(len(num_boxes))]
    return {key: torch.from_numpy(np.stack([e[key] for e in encoded]))
            for key in ("heatmap", "index", "mask", "size", "offset")}


class TargetCollate:
    """``iter_torch_batches`` collate: numpy rows -> uint8 images + dense targets (train worker).

    Returns ``{"image": uint8 [B,3,H,W], "targets": {...render_targets...}, "image_id",
    "input_to_original", "original_size"}``; the heatmap is rendered here, off the object store.
    """

    def __init__(self, config: Config, num_classes: int) -> None:
        height, width = config.data.input_size
        self.output_size = (height // OUTPUT_STRIDE, width // OUTPUT_STRIDE)
        self.num_classes = num_classes
        self.targets = config.targets

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        targets = render_targets(batch["boxes"], batch["classes"], batch["num_boxes"], self.num_classes,
                                 self.output_size, self.targets.max_objects, self.targets.min_overlap,
                                 self.targets.formula)
        # Ray hands out read-only zero-copy arrays; torch wants writable memory, so copy (small).
        return {
            "image": torch.tensor(batch["image"]),
            "targets": targets,
            "image_id": torch.tensor(batch["image_id"]),
            "input_to_original": torch.tensor(batch["input_to_original"]),
            "original_size": torch.tensor(batch["original_size"]),
        }
