"""Latency of the exported graph in onnxruntime vs the same model in PyTorch, on this CPU.

    python -m benchmarks.onnx_runtime [--repeats 10]

Both sides do the same work: uint8 letterboxed batch in, top-100 detections out (normalisation,
network, sigmoid, 3x3 peaks, top-K); PyTorch in float32 eager with channels_last (what
``Detector`` runs), onnxruntime with its CPU provider, both with the machine's cores as threads.
Models: the demo architecture at 128x128 and ResNet-18 (official recipe) at 512x512, random
weights (the same work as trained ones). Interleaved medians (benchmarks/timing.py).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from benchmarks.timing import compare, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    from centernet_ray.checkpoint import LoadedModel
    from centernet_ray.config import load_config
    from centernet_ray.detector import Detector
    from centernet_ray.export import OnnxDetector, export_onnx
    from centernet_ray.model import build_model

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    cases = [("demo", 4, [1, 16]), ("coco_resnet18", 80, [1, 4])]
    with tempfile.TemporaryDirectory() as tmp:
        for name, classes, batches in cases:
            torch.manual_seed(0)
            config = load_config(name, ["model.pretrained=null"])
            model = build_model(config.model, classes).eval()
            loaded = LoadedModel(model, config, [str(i) for i in range(classes)], list(range(1, classes + 1)), 0, {})
            path = export_onnx(loaded, Path(tmp) / f"{name}.onnx")
            pytorch, onnx = Detector(model, config.data.input_size), OnnxDetector(path, threads=threads)
            height, width = config.data.input_size
            for batch in batches:
                images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8)
                mapping = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(batch, 2, 3)
                sizes = torch.tensor([[width, height]]).expand(batch, 2)
                seconds = compare({"pytorch fp32 eager": lambda: pytorch.detect(images, mapping, sizes),
                                   "onnxruntime (CPU provider)": lambda: onnx.detect(images, mapping, sizes)},
                                  repeats=args.repeats)
                report(f"{name} {height}x{width}, batch {batch}, {threads} threads (per batch)", seconds,
                       "pytorch fp32 eager")


if __name__ == "__main__":
    main()
