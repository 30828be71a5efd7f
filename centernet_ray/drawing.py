"""Pictures for people: detections drawn on images, heatmap overlays, PNG grids."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, make_grid

from centernet_ray import storage
from centernet_ray.data.coco import CocoDataset
from centernet_ray.data.images import ImageDecodeError, decode_image
from centernet_ray.errors import UserInputError

log = logging.getLogger(__name__)

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
    """Write uint8 [3, H, W] images as one PNG grid to ``path`` (a file or a URI, its folder
    created) and return the path; smaller images are padded (black, right and bottom) to the largest."""
    if not images:
        raise ValueError("no images to draw")
    width, height = max(image.shape[-1] for image in images), max(image.shape[-2] for image in images)
    padded = [torch.nn.functional.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2]))
              for image in images]
    grid = make_grid(padded, nrow=columns, padding=2, pad_value=255)
    encoded = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(encoded, format="PNG")
    storage.write_bytes(path, encoded.getvalue())
    return str(path)


def save_annotations_png(dataset: CocoDataset, images: str, count: int, path: str | Path) -> str:
    """The first ``count`` images of ``dataset`` (read from the folder or URI ``images``) with their
    annotated boxes drawn, as one PNG grid at ``path`` (a folder: ``annotations.png`` in it);
    returns the path. Images that are missing or cannot be read are skipped, named in a warning."""
    path = str(path)
    if storage.kind(path) == "folder":
        path = storage.join(path, "annotations.png")
    elif not path.lower().endswith(".png"):
        raise UserInputError(f"--out {path}: give a .png file (or a folder, for annotations.png in it)")
    pictures, skipped = [], []
    for record in dataset.images[:count]:
        uri = storage.join(images, record.file_name)
        try:
            image = decode_image(storage.read_bytes(uri))
        except (OSError, ImageDecodeError) as exc:  # missing, a folder, unreadable
            skipped.append(f"{record.file_name} ({'missing' if isinstance(exc, FileNotFoundError) else exc})")
            continue
        pictures.append(draw_detections(image, torch.as_tensor(record.boxes), record.labels, dataset.class_names))
    if skipped:
        log.warning("skipped %d image(s) that cannot be drawn: %s", len(skipped), "; ".join(skipped[:5]))
    if not pictures:
        raise UserInputError(f"no images to draw: --count {count}, {len(dataset.images)} image(s) in "
                             f"{dataset.annotation_file}{', none of them readable' if skipped else ''}")
    return save_png_grid(pictures, path)
