"""COCO AP of one checkpoint's trained weights next to their EMA (``train.ema``): the same run, the
same steps, the same validation images, so the difference is the averaging alone.

    python -m benchmarks.ema CHECKPOINT [--flip-test] [--batch-size 32]

The checkpoint must come from a run with ``train.ema=true`` (it then holds both sets of weights).
Validation images are those of the checkpoint's config (``data`` section), letterboxed as in training.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from centernet_ray import storage
from centernet_ray.checkpoint import load_checkpoint
from centernet_ray.config import config_from_dict
from centernet_ray.data.coco import load_coco
from centernet_ray.data.images import decode_image
from centernet_ray.data.sources import split_sources
from centernet_ray.detector import Detector
from centernet_ray.evaluation import coco_evaluate, detections_to_coco
from centernet_ray.model import build_model


def evaluate_weights(weights: dict, state: dict, flip_test: bool, batch_size: int) -> dict[str, float]:
    config = config_from_dict(state["config"])
    model = build_model(dataclasses.replace(config.model, pretrained=None), len(state["class_names"]))
    model.load_state_dict(weights)
    detector = Detector(model, config.data.input_size, "cpu", flip_test=flip_test)
    val = split_sources(config.data)["val"]
    dataset = load_coco(val.annotations, val.images)
    results, image_ids = [], []
    for start in range(0, len(dataset.images), batch_size):
        records = dataset.images[start:start + batch_size]
        images = [decode_image(storage.join(val.images, r.file_name)) for r in records]
        for record, found in zip(records, detector.detect_images(images, k=100)):
            results += detections_to_coco([record.image_id], found.boxes[None], found.scores[None],
                                          found.classes[None], state["category_ids"])
            image_ids.append(record.image_id)
    return coco_evaluate(val.annotations, results, image_ids=image_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--flip-test", action="store_true", help="as the demo evaluates (train.eval_flip_test)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    state = load_checkpoint(args.checkpoint)
    if not state.get("ema"):
        raise SystemExit(f"{args.checkpoint} holds no EMA weights: train with train.ema=true")
    train = state["config"]["train"]
    print(f"checkpoint epoch {state['epoch']}, {state['ema']['updates']} EMA updates, decay {train['ema_decay']}, "
          f"tau {train['ema_tau']}, flip test {args.flip_test}")
    rows = {}
    for name, weights in (("trained", state["model"]), ("EMA", state["ema"]["weights"])):
        started = time.perf_counter()
        rows[name] = evaluate_weights(weights, state, args.flip_test, args.batch_size)
        print(f"  {name:>8}: AP {rows[name]['AP']:.4f}  AP50 {rows[name]['AP50']:.4f}  AP75 {rows[name]['AP75']:.4f}"
              f"  ({time.perf_counter() - started:.1f} s)")
    for stat in ("AP", "AP50", "AP75"):
        print(f"  EMA - trained {stat}: {rows['EMA'][stat] - rows['trained'][stat]:+.4f}")


if __name__ == "__main__":
    main()
