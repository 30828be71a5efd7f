"""The detector as one ONNX graph (network, sigmoid, 3x3 max-pool peaks and top-K inside), run with
onnxruntime, and checked against PyTorch on the validation set."""

from centernet_ray.export.graph import DetectionGraph, export_onnx
from centernet_ray.export.runtime import OnnxDetector

__all__ = ["DetectionGraph", "OnnxDetector", "export_onnx"]
