"""An exported detector run by onnxruntime, with the same ``detect`` interface as ``Detector``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from centernet_ray.decode import boxes_to_original
from centernet_ray.detector import Detections, letterbox_batch, split_detections
from centernet_ray.export.graph import INPUT_NAME


class OnnxDetector:
    """Runs an ONNX file written by ``export_onnx`` on the CPU (onnxruntime's CPU provider)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.input_size = tuple(json.loads(meta["centernet_ray.input_size"]))
        self.class_names = json.loads(meta["centernet_ray.class_names"])
        self.category_ids = json.loads(meta["centernet_ray.category_ids"])
        self.max_detections = int(meta["centernet_ray.max_detections"])
        self.version = meta.get("centernet_ray.model_version", "")

    def run(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 [B, 3, H_in, W_in] -> boxes [B, K, 4] input pixels, scores [B, K], classes [B, K]."""
        boxes, scores, classes = self.session.run(None, {INPUT_NAME: images.numpy()})
        return boxes, scores, classes

    def detect(self, images: torch.Tensor, input_to_original: torch.Tensor, original_size: torch.Tensor,
               k: int = 100, score_threshold: float = 0.0) -> list[Detections]:
        """As ``Detector.detect``: at most ``min(k, the exported K)`` detections per image, original pixels."""
        boxes, scores, classes = self.run(images)
        k = min(k, self.max_detections)
        mapped = boxes_to_original(torch.from_numpy(boxes[:, :k]), input_to_original, output_stride=1,
                                   image_sizes=original_size)
        return split_detections(mapped.numpy(), scores[:, :k], classes[:, :k], score_threshold)

    def detect_images(self, images: list[torch.Tensor], k: int = 100, score_threshold: float = 0.0) -> list[Detections]:
        """Letterbox raw uint8 [3, H, W] images of any sizes and detect on them as one batch."""
        return self.detect(*letterbox_batch(images, self.input_size), k, score_threshold)
