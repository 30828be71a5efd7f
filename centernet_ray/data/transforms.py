"""Preprocessing: every image becomes a fixed-size network input through one crop-and-resize.

Both presets cut a region (top, left, height, width) of the original image, padding with zeros
where it extends past the borders, and resize it to ``input_size`` with torchvision transforms v2;
``tv_tensors.BoundingBoxes`` make the boxes follow the image. Validation uses the centred
letterbox region; training picks a random scale and centre (the official CenterNet recipe), then
flips and jitters colours. Each result carries ``input_to_original``, the [2, 3] affine matrix
that takes network-input pixels back to original pixels, used to decode boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from centernet_ray.config import DataConfig

AugmentPreset = Literal["centernet", "flip", "none"]


@dataclass
class Preprocessed:
    image: torch.Tensor  # uint8 [3, H_in, W_in]
    boxes: torch.Tensor  # float32 [N, 4] x1, y1, x2, y2 in input pixels (clipped, empty ones removed)
    labels: torch.Tensor  # int64 [N]
    input_to_original: torch.Tensor  # float32 [2, 3]


def letterbox_region(width: int, height: int, input_size: tuple[int, int], scale: float = 1.0,
                     center: tuple[float, float] | None = None) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of the region with the input's aspect ratio that holds the whole
    image at ``scale`` 1 (larger scale = zoom out), centred on ``center`` (default: the image centre)."""
    in_h, in_w = input_size
    fit = max(height / in_h, width / in_w) * scale
    crop_h, crop_w = max(1, math.ceil(in_h * fit)), max(1, math.ceil(in_w * fit))
    cx, cy = center if center is not None else (width / 2, height / 2)
    return int(round(cy - crop_h / 2)), int(round(cx - crop_w / 2)), crop_h, crop_w


def region_to_original(top: int, left: int, crop_h: int, crop_w: int, input_size: tuple[int, int],
                       flipped: bool = False) -> torch.Tensor:
    """[2, 3] affine taking input pixels (x, y) to original pixels for a crop-resize (+ mirror)."""
    in_h, in_w = input_size
    sx, sy = crop_w / in_w, crop_h / in_h
    if flipped:  # x_in' = in_w - x_in
        return torch.tensor([[-sx, 0.0, left + in_w * sx], [0.0, sy, float(top)]], dtype=torch.float32)
    return torch.tensor([[sx, 0.0, float(left)], [0.0, sy, float(top)]], dtype=torch.float32)


def _wrap(image: torch.Tensor, boxes: np.ndarray | torch.Tensor) -> tuple[tv_tensors.Image, tv_tensors.BoundingBoxes]:
    height, width = image.shape[-2:]
    return (tv_tensors.Image(image),
            tv_tensors.BoundingBoxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                     format="XYXY", canvas_size=(height, width)))


def _keep_nonempty(boxes: torch.Tensor, labels: torch.Tensor, min_size: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    return boxes[keep].as_subclass(torch.Tensor), labels[keep]


class ValTransform:
    """Deterministic letterbox to ``input_size`` (height, width)."""

    def __init__(self, input_size: tuple[int, int]) -> None:
        self.input_size = tuple(input_size)

    def __call__(self, image: torch.Tensor, boxes: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> Preprocessed:
        img, bbs = _wrap(image, boxes)
        height, width = image.shape[-2:]
        top, left, crop_h, crop_w = letterbox_region(width, height, self.input_size)
        out_img = F.resized_crop(img, top, left, crop_h, crop_w, list(self.input_size))
        out_boxes = F.resized_crop(bbs, top, left, crop_h, crop_w, list(self.input_size))
        kept_boxes, kept_labels = _keep_nonempty(out_boxes, torch.as_tensor(labels, dtype=torch.int64))
        return Preprocessed(out_img.as_subclass(torch.Tensor), kept_boxes, kept_labels,
                            region_to_original(top, left, crop_h, crop_w, self.input_size))


class TrainTransform:
    """Random scale + crop (one crop-resize), horizontal flip and colour jitter, per ``preset``:
    ``centernet`` all three; ``flip`` letterbox + flip; ``none`` the validation letterbox."""

    def __init__(self, input_size: tuple[int, int], preset: AugmentPreset = "centernet",
                 scale_range: tuple[float, float] = (0.6, 1.4), flip_prob: float = 0.5,
                 color_jitter: float = 0.4) -> None:
        self.input_size = tuple(input_size)
        self.preset = preset
        self.scale_range = scale_range
        self.flip_prob = flip_prob if preset != "none" else 0.0
        self.jitter = color_jitter if preset == "centernet" else 0.0

    @classmethod
    def from_config(cls, config: DataConfig) -> "TrainTransform":
        return cls(config.input_size, config.augment, config.scale_range, config.flip_prob, config.color_jitter)

    def __call__(self, image: torch.Tensor, boxes: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 seed: int | None = None) -> Preprocessed:
        """Augment one uint8 [3, H, W] image; the same ``seed`` gives the same result."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        uniform = lambda low, high: low + (high - low) * torch.rand((), generator=generator).item()  # noqa: E731
        height, width = image.shape[-2:]
        if self.preset == "centernet":
            scale = uniform(*self.scale_range)
            center = (uniform(0.25, 0.75) * width, uniform(0.25, 0.75) * height)
            region = letterbox_region(width, height, self.input_size, scale, center)
        else:
            region = letterbox_region(width, height, self.input_size)
        flipped = uniform(0.0, 1.0) < self.flip_prob

        img, bbs = _wrap(image, boxes)
        size = list(self.input_size)
        # bilinear without antialiasing, as the official affine warp: the scale jitter spans both ways
        img, bbs = F.resized_crop(img, *region, size, antialias=False), F.resized_crop(bbs, *region, size)
        if flipped:
            img, bbs = F.horizontal_flip(img), F.horizontal_flip(bbs)
        if self.jitter > 0:
            factors = [uniform(1 - self.jitter, 1 + self.jitter) for _ in range(3)]
            img = tv_tensors.Image(jitter_colors(img.as_subclass(torch.Tensor), *factors))
        kept_boxes, kept_labels = _keep_nonempty(bbs, torch.as_tensor(labels, dtype=torch.int64))
        return Preprocessed(img.as_subclass(torch.Tensor), kept_boxes, kept_labels,
                            region_to_original(*region, self.input_size, flipped=flipped))


def jitter_colors(image: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """Brightness, contrast and saturation factors (1 = unchanged) on a uint8 [3, H, W] image.

    The definitions of torchvision's ``adjust_*`` functions (scale; blend with the mean grey; blend
    with the per-pixel grey), fused into one float pass with a single clamp at the end instead of
    a uint8 round trip after each step: equal where no step saturates, ~2x cheaper.
    """
    x = image.float()
    mean = F.rgb_to_grayscale(x.unsqueeze(0)).mean() * brightness
    # (x * b - mean) * c + mean, as one multiply-add
    x = x.mul_(brightness * contrast).add_(mean * (1 - contrast))
    gray = F.rgb_to_grayscale(x.unsqueeze(0))[0]
    x = x.mul_(saturation).add_(gray, alpha=1 - saturation)
    return x.clamp_(0, 255).round_().to(torch.uint8)


def normalize_images(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 normalised network input (done on the train/serve worker)."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean_t) / std_t
