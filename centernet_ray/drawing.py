"""Pictures for people: detections drawn on images, heatmap overlays, PNG grids."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, make_grid

from centernet_ray import storage

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
           "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, classes: Sequence[int],
                    class_names: Sequence[str], scores: Sequence[float] | None = None, width: int = 2) -> torch.Tensor:
    """uint8 [3, H, W] image with ``boxes`` [N, 4] (x1, y1, x2, y2 pixels) drawn and labelled."""
    classes = [int(c) for c in classes]
    labels = [class_names[c] if scores is None else f"{class_names[c]} {float(s):.2f}"
              for c, s in zip(classes, scores if scores is not None else classes)]
    colors = [PALETTE[c % len(PALETTE)] for c in classes]
    if len(classes) == 0:
        return image.clone()
    return draw_bounding_boxes(image, boxes.float(), labels=labels, colors=colors, width=width)


def detections_png(image: torch.Tensor, boxes: torch.Tensor, classes: Sequence[int], class_names: Sequence[str],
                   scores: Sequence[float] | None = None) -> bytes:
    """PNG bytes of uint8 [3, H, W] ``image`` with ``boxes`` [N, 4] (x1, y1, x2, y2 pixels) drawn."""
    import io

    drawn = draw_detections(image, boxes, classes, class_names, scores)
    buffer = io.BytesIO()
    Image.fromarray(drawn.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def heatmap_overlay(image: torch.Tensor, heatmap: torch.Tensor, opacity: float = 0.6) -> torch.Tensor:
    """uint8 [3, H, W] image blended with the per-pixel class maximum of ``heatmap`` [C, h, w] in
    [0, 1] (up-sampled to the image), drawn in red."""
    heat = heatmap.float().amax(0, keepdim=True)[None]  # [1, 1, h, w]
    heat = torch.nn.functional.interpolate(heat, size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
    heat = heat.clamp(0, 1)
    red = torch.zeros_like(image, dtype=torch.float32)
    red[0] = 255.0
    blended = image.float() * (1 - opacity * heat) + red * opacity * heat
    return blended.round().clamp(0, 255).to(torch.uint8)


def save_png_grid(images: Sequence[torch.Tensor], path: str | Path, columns: int = 4) -> str:
    """Write uint8 [3, H, W] images (same size) as one PNG grid to ``path`` (a file or a URI, its
    folder created) and return the path."""
    if not images:
        raise ValueError("no images to draw")
    grid = make_grid(list(images), nrow=columns, padding=2, pad_value=255)
    encoded = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(encoded, format="PNG")
    storage.write_bytes(path, encoded.getvalue())
    return str(path)
