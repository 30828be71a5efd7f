"""Batched detection with a trained model: preprocessed images -> boxes in original pixels.

Shared by evaluation during training, batch inference (``predict``) and the Serve endpoint, so
the three give the same detections for the same image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from centernet_ray.checkpoint import LoadedModel, model_from_checkpoint
from centernet_ray.data.transforms import ValTransform, normalize_images
from centernet_ray.decode import boxes_to_original, decode, fuse_flip
from centernet_ray.model import IMAGE_MEAN, IMAGE_STD, OUTPUT_STRIDE, CenterNet
from centernet_ray.precision import autocast_dtype


@dataclass
class Detections:
    """One image's detections: boxes [N, 4] x1, y1, x2, y2 original pixels, scores [N], classes [N]."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


class Detector:
    """Runs the model and ``decode`` for whole batches on one device."""

    def __init__(self, model: CenterNet, input_size: tuple[int, int], device: str | torch.device = "cpu",
                 flip_test: bool = False, amp: str = "none") -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.input_size = tuple(input_size)
        self.flip_test = flip_test
        self.amp_dtype = autocast_dtype(amp, self.device)

    @classmethod
    def from_checkpoint(cls, path: str, device: str | torch.device = "cpu", flip_test: bool = False) -> tuple["Detector", LoadedModel]:
        loaded = model_from_checkpoint(path, device)
        return cls(loaded.model, loaded.config.data.input_size, device, flip_test), loaded

    @torch.inference_mode()
    def raw_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [B, 3, H_in, W_in] -> heatmap probabilities, size and offset maps (flip-fused if on)."""
        inputs = normalize_images(images.to(self.device, non_blocking=True), IMAGE_MEAN, IMAGE_STD)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            outputs = self.model(inputs)
            if self.flip_test:
                mirrored = self.model(inputs.flip(-1))
        outputs = {k: v.float() for k, v in outputs.items()}
        if self.flip_test:
            return fuse_flip(outputs, {k: v.float() for k, v in mirrored.items()})
        return {**outputs, "heatmap": torch.sigmoid(outputs["heatmap"])}

    @torch.inference_mode()
    def detect(self, images: torch.Tensor, input_to_original: torch.Tensor, original_size: torch.Tensor,
               k: int = 100, score_threshold: float = 0.0) -> list[Detections]:
        """Detections per image for a preprocessed batch.

        Args: images uint8 [B, 3, H_in, W_in]; input_to_original [B, 2, 3]; original_size [B, 2]
        (width, height); at most ``k`` detections per image with score > ``score_threshold``.
        """
        out = self.raw_outputs(images)
        boxes, scores, classes = decode(out["heatmap"], out["size"], out["offset"], k)  # [B,K,4], [B,K], [B,K]
        boxes = boxes_to_original(boxes, input_to_original.to(boxes.device), OUTPUT_STRIDE,
                                  original_size.to(boxes.device))
        return split_detections(boxes.cpu().numpy(), scores.cpu().numpy(), classes.cpu().numpy(), score_threshold)

    def detect_images(self, images: list[torch.Tensor], k: int = 100, score_threshold: float = 0.0) -> list[Detections]:
        """Letterbox raw uint8 [3, H, W] images of any sizes and detect on them as one batch."""
        return self.detect(*letterbox_batch(images, self.input_size), k, score_threshold)


@dataclass
class LetterboxedBatch:
    """Network inputs of a batch and what maps detections back to each original image."""

    images: torch.Tensor  # uint8 [B, 3, H_in, W_in]
    input_to_original: torch.Tensor  # [B, 2, 3]
    original_size: torch.Tensor  # [B, 2] (width, height)

    def __iter__(self):  # unpacks as (images, input_to_original, original_size)
        return iter((self.images, self.input_to_original, self.original_size))


def letterbox_batch(images: list[torch.Tensor], input_size: tuple[int, int]) -> LetterboxedBatch:
    """uint8 [3, H, W] images of any sizes -> the letterboxed batch every detector runs on."""
    letterbox = ValTransform(tuple(input_size))
    prepared = [letterbox(image, np.zeros((0, 4)), np.zeros(0)) for image in images]
    return LetterboxedBatch(torch.stack([p.image for p in prepared]), torch.stack([p.input_to_original for p in prepared]),
                            torch.tensor([[image.shape[2], image.shape[1]] for image in images]))


def split_detections(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                     score_threshold: float = 0.0) -> list[Detections]:
    """Per-image :class:`Detections` from batched arrays ([B, K, 4], [B, K], [B, K]) above the threshold."""
    results = []
    for b in range(len(scores)):
        keep = scores[b] > score_threshold
        results.append(Detections(boxes[b][keep], scores[b][keep], classes[b][keep]))
    return results
