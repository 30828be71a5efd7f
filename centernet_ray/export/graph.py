"""The whole detector, decoding included, as one exportable graph, and its ONNX export.

CenterNet needs no NMS: its decoding is a 3x3 max-pool and a top-K, plain tensor operations, so
the exported graph maps letterboxed uint8 images straight to the top-K detections. What it needs
from outside is the letterbox (``detector.letterbox_batch``) and the inverse affine that maps its
boxes back to the original image, both stored next to the graph in its metadata.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from centernet_ray.checkpoint import LoadedModel
from centernet_ray.data.transforms import normalize_images
from centernet_ray.decode import decode
from centernet_ray.errors import UserInputError
from centernet_ray.model import IMAGE_MEAN, IMAGE_STD, OUTPUT_STRIDE
from centernet_ray.model.resnet import resnet_arch

log = logging.getLogger(__name__)

OPSET = 19  # DeformConv (deformable models) needs 19
INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "classes")


class DetectionGraph(nn.Module):
    """uint8 letterboxed images [B, 3, H, W] -> boxes [B, K, 4] (x1, y1, x2, y2 in input pixels),
    scores [B, K] (descending) and classes [B, K] (int64 class indices)."""

    def __init__(self, model: nn.Module, k: int = 100) -> None:
        super().__init__()
        self.model = model
        self.k = k

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs = self.model(normalize_images(images, IMAGE_MEAN, IMAGE_STD))
        boxes, scores, classes = decode(torch.sigmoid(outputs["heatmap"]), outputs["size"], outputs["offset"], self.k)
        return boxes * OUTPUT_STRIDE, scores, classes


def graph_metadata(loaded: LoadedModel, k: int, version: str) -> dict[str, str]:
    """What a client needs beside the graph, stored in the ONNX file's metadata_props."""
    height, width = loaded.config.data.input_size
    return {
        "centernet_ray.input_size": json.dumps([height, width]),
        "centernet_ray.class_names": json.dumps(loaded.class_names),
        "centernet_ray.category_ids": json.dumps(loaded.category_ids),
        "centernet_ray.max_detections": str(k),
        "centernet_ray.model_version": version,
        "centernet_ray.epoch": str(loaded.epoch),
        "centernet_ray.letterbox": "centred: scale = max(h / H, w / W), the image in the middle of an "
                                   "H*scale x W*scale region, resized to H x W; boxes are in input pixels",
    }


def export_onnx(loaded: LoadedModel, path: str | Path, k: int = 100, version: str = "") -> Path:
    """Write ``loaded``'s model with decoding as a self-contained ONNX file (dynamic batch size).

    The graph runs in float32. Deformable models use ONNX's DeformConv (opset 19); the export
    checks that onnxruntime can run the result and names the plain-conv variant when it cannot."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = loaded.model.float().eval().to("cpu")
    graph = DetectionGraph(model, k).eval()
    height, width = loaded.config.data.input_size
    example = torch.zeros(2, 3, height, width, dtype=torch.uint8)
    started = time.perf_counter()
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # the exporter's per-pass INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and opset-conversion notes
        torch.onnx.export(graph, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=4096)}})
    proto = onnx.load(str(path))
    for key, value in graph_metadata(loaded, k, version).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    log.info("exported %s (%.1f MB) in %.1f s", path, path.stat().st_size / 1e6, time.perf_counter() - started)
    _check_runtime_support(path, loaded)
    return path


def _check_runtime_support(path: Path, loaded: LoadedModel) -> None:
    from centernet_ray.export.runtime import OnnxDetector

    height, width = loaded.config.data.input_size
    try:
        OnnxDetector(path).run(torch.zeros(1, 3, height, width, dtype=torch.uint8))
    except Exception as exc:  # onnxruntime raises its own error types (NOT_IMPLEMENTED, INVALID_GRAPH, ...)
        hint = ""
        if loaded.config.model.deformable:
            plain = resnet_arch(loaded.config.model.backbone)
            hint = (f"; this model uses deformable convolutions: train the plain-conv variant "
                    f"(model.backbone={plain} model.deformable=false) to export it")
        raise UserInputError(f"onnxruntime cannot run the exported {path.name}: {exc}{hint}") from exc
