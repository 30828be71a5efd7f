"""Logging the final model to MLflow: MLflow's defaults vs ``centernet_ray.tracking.log_model``.

    python -m benchmarks.log_model [--repeats 3] [--official]

Both log the same model in the same ``pt2`` format to a throw-away SQLite store. MLflow's defaults
infer the pip requirements (a subprocess that loads the saved model to see what it imports) and
run the serving-input check; ``log_model`` states the requirements and skips the check. Models: the
demo architecture at 128x128, with ``--official`` also ResNet-18 (official recipe) at 512x512;
random weights. Interleaved medians (benchmarks/timing.py); the machine's CPU kind is printed.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from benchmarks.timing import compare, cpu_kind, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--official", action="store_true", help="also ResNet-18 at 512x512 (80 classes)")
    args = parser.parse_args()

    import mlflow
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from centernet_ray.config import load_config
    from centernet_ray.model import build_model
    from centernet_ray.tracking import log_model

    logging.getLogger("mlflow").setLevel(logging.ERROR)  # the defaults' serving-input warning, every call
    print(f"CPU kind: {cpu_kind()}")
    cases = [("demo", 4)] + ([("coco_resnet18", 80)] if args.official else [])
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        for name, classes in cases:
            config = load_config(name)
            model = build_model(config.model, classes).eval()
            size = tuple(config.data.input_size)
            signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, *size))]))
            example = np.zeros((2, 3, *size), dtype=np.float32)

            def mlflow_defaults() -> None:
                with mlflow.start_run():
                    mlflow.pytorch.log_model(model, name="model", input_example=example, signature=signature,
                                             serialization_format="pt2")

            def stated_requirements() -> None:
                with mlflow.start_run():
                    log_model(model, size)

            seconds = compare({"MLflow defaults (inferred)": mlflow_defaults,
                               "centernet_ray log_model": stated_requirements}, repeats=args.repeats, warmup=1)
            report(f"log_model, {name} at {size[0]}x{size[1]} ({classes} classes), seconds per call x 1000",
                   seconds, "MLflow defaults (inferred)")


if __name__ == "__main__":
    main()
