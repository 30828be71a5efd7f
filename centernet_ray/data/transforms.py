"""Preprocessing: every image becomes a fixed-size network input through one crop-and-resize.

Every preset cuts a region (top, left, height, width) of the original image, padding with zeros
where it extends past the borders, and resizes it to ``input_size`` with torchvision transforms v2;
``tv_tensors.BoundingBoxes`` make the boxes follow the image. Validation uses the centred
letterbox region. Training presets:

- ``centernet_official``: the official CenterNet recipe (``src/lib/datasets/sample/ctdet.py``): a
  scale drawn from the discrete set ``np.arange(low, high, 0.1)`` of ``scale_range`` (0.6, 0.7, ...,
  1.3 for [0.6, 1.4]), a centre drawn in whole pixels at least ``official_border(128, side)`` from
  the image's borders, a flip, then brightness, contrast and saturation in a shuffled order
  (blending with the grey image and its mean taken before any of them) and PCA lighting noise
  (``color_jitter: 0`` turns off all colour augmentation, lighting included, as the official
  ``--no_color_aug``).
- ``centernet``: a faster variant: continuous scale in ``scale_range``, centre anywhere in the
  middle half of the image, one fused brightness/contrast/saturation pass, no lighting noise.
- ``flip``: the letterbox and a flip; ``none``: the validation letterbox.

Each result carries ``input_to_original``, the [2, 3] affine matrix that takes network-input pixels
back to original pixels, used to decode boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from centernet_ray.config import LETTERBOX_PRESETS, DataConfig
from centernet_ray.errors import UserInputError

AugmentPreset = Literal["centernet", "centernet_official", "flip", "none"]

# The official COCO dataset's PCA of pixel colours (``_eig_val``, ``_eig_vec`` in
# src/lib/datasets/dataset/coco.py), for images in [0, 1]. The official images are BGR (OpenCV): the
# rows of its eigenvector matrix are the B, G, R channels, so they are reversed here for RGB.
PCA_EIGENVALUES = torch.tensor([0.2141788, 0.01817699, 0.00341571])
PCA_EIGENVECTORS_RGB = torch.tensor([[-0.58752847, -0.69563484, 0.41340352],
                                     [-0.5832747, 0.00994535, -0.81221408],
                                     [-0.56089297, 0.71832671, 0.41158938]]).flip(0)
LIGHTING_STD = 0.1  # official: lighting_(data_rng, image, 0.1, ...)
OFFICIAL_CROP_BORDER = 128  # official: self._get_border(128, side)
COLOR_OPS = ("brightness", "contrast", "saturation")


@dataclass
class Prepared:
    """The deterministic part of a training transform (what ``data.cache`` keeps): the decoded image
    for the cropping presets; the letterboxed input for ``flip`` and ``none``, with its ``region``."""

    image: torch.Tensor  # uint8 [3, H, W]
    boxes: torch.Tensor  # float32 [N, 4] x1, y1, x2, y2 in the pixels of ``image``
    labels: torch.Tensor  # int64 [N]
    region: tuple[int, int, int, int] | None  # (top, left, crop_h, crop_w) applied; None: not cropped yet


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
    """The boxes [N, 4] at least ``min_size`` wide and high, and their labels [N]: the inputs
    themselves (not copies) when every box is kept."""
    boxes = boxes.as_subclass(torch.Tensor)
    keep = ((boxes[:, 2:] - boxes[:, :2]) >= min_size).all(1)
    if bool(keep.all()):  # the usual case; mask indexing took ~70 us per row on a few boxes
        return boxes, labels
    return boxes[keep], labels[keep]


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


def official_border(border: int, size: int) -> int:
    """The official ``_get_border``: ``border`` halved until the image side keeps more than it on
    each side (128 for sides above 256, 32 for 128 px); random crop centres stay this far inside."""
    divisor = 1
    while size - border // divisor <= border // divisor:
        divisor *= 2
    return border // divisor


def official_scales(scale_range: tuple[float, float]) -> list[float]:
    """The official discrete crop scales, ``np.arange(low, high, 0.1)``: 0.6, 0.7, ..., 1.3 for (0.6, 1.4)."""
    return [float(s) for s in np.arange(scale_range[0], scale_range[1], 0.1)]


class TrainTransform:
    """Random scale + crop (one crop-resize), horizontal flip and colour augmentation, per ``preset``
    (see the module docstring): ``centernet_official``, ``centernet``, ``flip`` or ``none``."""

    def __init__(self, input_size: tuple[int, int], preset: AugmentPreset = "centernet",
                 scale_range: tuple[float, float] = (0.6, 1.4), flip_prob: float = 0.5,
                 color_jitter: float = 0.4) -> None:
        self.input_size = tuple(input_size)
        self.preset = preset
        self.scale_range = scale_range
        self.scales = official_scales(scale_range) if preset == "centernet_official" else []
        if preset == "centernet_official" and not self.scales:
            raise UserInputError(f"scale_range {list(scale_range)} holds no scale: centernet_official draws from "
                                 "np.arange(low, high, 0.1), so it needs low < high")
        self.flip_prob = flip_prob if preset != "none" else 0.0
        self.jitter = color_jitter if preset in ("centernet", "centernet_official") else 0.0

    @classmethod
    def from_config(cls, config: DataConfig) -> "TrainTransform":
        return cls(config.input_size, config.augment, config.scale_range, config.flip_prob, config.color_jitter)

    def __call__(self, image: torch.Tensor, boxes: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 seed: int | None = None) -> Preprocessed:
        """Augment one uint8 [3, H, W] image; the same ``seed`` gives the same result."""
        return self.finish(self.prepare(image, boxes, labels), seed)

    def prepare(self, image: torch.Tensor, boxes: np.ndarray | torch.Tensor,
                labels: np.ndarray | torch.Tensor) -> Prepared:
        """The part of the transform that is the same every epoch: the letterbox of ``flip`` and
        ``none`` (the cropping presets draw their region at random, so nothing is done for them)."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if self.preset not in LETTERBOX_PRESETS:
            return Prepared(image, boxes, labels, None)
        height, width = image.shape[-2:]
        region = letterbox_region(width, height, self.input_size)
        img, bbs = _wrap(image, boxes)
        size = list(self.input_size)
        # bilinear without antialiasing, as the official affine warp
        img, bbs = F.resized_crop(img, *region, size, antialias=False), F.resized_crop(bbs, *region, size)
        return Prepared(img.as_subclass(torch.Tensor), bbs.as_subclass(torch.Tensor), labels, region)

    def finish(self, prepared: Prepared, seed: int | None = None) -> Preprocessed:
        """The random part, on what :meth:`prepare` returned (``prepare`` + ``finish`` = ``__call__``)."""
        if prepared.region is None:
            return self._crop_and_augment(prepared.image, prepared.boxes, prepared.labels, seed)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        flipped = torch.rand((), generator=generator).item() < self.flip_prob
        image, boxes = prepared.image, prepared.boxes
        if flipped:  # plain tensor ops, ~3x faster per row than the tv_tensors dispatch; the same values
            # as F.horizontal_flip: torchvision computes x' = -(x - W), which is W - x exactly
            width = self.input_size[1]
            image = image.flip(-1)
            boxes = boxes.clone()
            boxes[:, 0], boxes[:, 2] = width - prepared.boxes[:, 2], width - prepared.boxes[:, 0]
        kept_boxes, kept_labels = _keep_nonempty(boxes, prepared.labels)
        return Preprocessed(image, kept_boxes, kept_labels,
                            region_to_original(*prepared.region, self.input_size, flipped=flipped))

    def _crop_and_augment(self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                          seed: int | None) -> Preprocessed:
        """``centernet`` and ``centernet_official``: a random region, flip and colours."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        uniform = lambda low, high: low + (high - low) * torch.rand((), generator=generator).item()  # noqa: E731
        randint = lambda low, high: int(torch.randint(low, high, (), generator=generator))  # noqa: E731
        height, width = image.shape[-2:]
        if self.preset == "centernet_official":
            scale = self.scales[randint(0, len(self.scales))]
            border_x, border_y = official_border(OFFICIAL_CROP_BORDER, width), official_border(OFFICIAL_CROP_BORDER, height)
            center = (randint(border_x, width - border_x), randint(border_y, height - border_y))
            region = letterbox_region(width, height, self.input_size, scale, center)
        else:  # centernet
            scale = uniform(*self.scale_range)
            center = (uniform(0.25, 0.75) * width, uniform(0.25, 0.75) * height)
            region = letterbox_region(width, height, self.input_size, scale, center)
        flipped = uniform(0.0, 1.0) < self.flip_prob

        img, bbs = _wrap(image, boxes)
        size = list(self.input_size)
        # bilinear without antialiasing, as the official affine warp: the scale jitter spans both ways
        img, bbs = F.resized_crop(img, *region, size, antialias=False), F.resized_crop(bbs, *region, size)
        if flipped:
            img, bbs = F.horizontal_flip(img), F.horizontal_flip(bbs)
        if self.jitter > 0 and self.preset == "centernet_official":
            order = torch.randperm(3, generator=generator).tolist()
            factors = [uniform(1 - self.jitter, 1 + self.jitter) for _ in range(3)]
            lighting = torch.randn(3, generator=generator) * LIGHTING_STD
            img = tv_tensors.Image(official_color_aug(img.as_subclass(torch.Tensor), order, factors, lighting))
        elif self.jitter > 0:
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


def official_color_aug(image: torch.Tensor, order: list[int], factors: list[float],
                       lighting: torch.Tensor) -> torch.Tensor:
    """The official ``color_aug`` on a uint8 [3, H, W] RGB image; returns uint8 [3, H, W].

    ``order``: a permutation of (0 brightness, 1 contrast, 2 saturation), applied in that order with
    ``factors[op]`` (official: 1 + U(-0.4, 0.4) each); the grey image and its mean are taken once,
    before any of them: brightness x *= a; contrast x = a x + (1 - a) mean(grey); saturation
    x = a x + (1 - a) grey. Then PCA lighting: x += eigenvectors @ (eigenvalues * ``lighting`` [3]).
    The official code works on [0, 1] floats and never clamps; here the result is clamped and
    rounded back to uint8 (the pipeline's transport type).
    """
    x = image.float()
    gray = F.rgb_to_grayscale(x.unsqueeze(0))[0]  # [1, H, W]
    gray_mean = gray.mean()
    for op in order:
        factor = factors[op]
        if COLOR_OPS[op] == "brightness":
            x.mul_(factor)
        elif COLOR_OPS[op] == "contrast":
            x.mul_(factor).add_(gray_mean * (1 - factor))
        else:
            x.mul_(factor).add_(gray, alpha=1 - factor)
    shift = PCA_EIGENVECTORS_RGB @ (PCA_EIGENVALUES * lighting.float())  # [3], in [0, 1] units
    x.add_((shift * 255).view(3, 1, 1))
    return x.clamp_(0, 255).round_().to(torch.uint8)


def normalize_images(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 normalised network input (done on the train/serve worker)."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean_t) / std_t
