"""COCO AP of one checkpoint's detections with the boxes clipped to the image, as centernet-ray
evaluates, serves and predicts, and unclipped, as the official CenterNet evaluates
(``ctdet_post_process`` maps boxes back without clipping them):

    python -m benchmarks.eval_box_clipping --checkpoint outputs/ray_results/centernet-resnet18/epoch_NNNN

The same detections both ways (the checkpoint's validation set, its evaluation flip test and
precision, in this process on the CPU); only the clip differs. Clipping can only raise the IoU with
a ground-truth box that lies inside the image, so the clipped AP is the higher one.
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder or file of a training run")
    parser.add_argument("--max-images", type=int, default=None, help="the first N validation images only")
    args = parser.parse_args()

    from centernet_ray import detector as detector_module
    from centernet_ray.checkpoint import model_from_checkpoint
    from centernet_ray.decode import boxes_to_original
    from centernet_ray.detector import Detector
    from centernet_ray.evaluation.evaluate import evaluate
    from centernet_ray.export.check import validation_batches

    loaded = model_from_checkpoint(args.checkpoint, "cpu")
    train = loaded.config.train
    detector = Detector(loaded.model, loaded.config.data.input_size, "cpu", flip_test=train.eval_flip_test,
                        amp=train.amp)

    outside = {"boxes": 0, "all": 0}

    def unclipped(boxes, input_to_original, output_stride=4, image_sizes=None):
        mapped = boxes_to_original(boxes, input_to_original, output_stride)  # [B, K, 4]
        clipped = boxes_to_original(boxes, input_to_original, output_stride, image_sizes)
        outside["boxes"] += int((mapped != clipped).any(-1).sum())
        outside["all"] += mapped.shape[0] * mapped.shape[1]
        return mapped

    stats = {}
    for name, patch in (("clipped", contextlib.nullcontext()),  # the Detector as it is
                        ("unclipped", mock.patch.object(detector_module, "boxes_to_original", unclipped))):
        batches, instances = validation_batches(loaded, max_images=args.max_images)
        with patch:
            stats[name] = evaluate(detector, batches, loaded.category_ids, instances).stats
    print(f"checkpoint {args.checkpoint}: {int(stats['clipped']['eval_images'])} validation images, "
          f"flip test {train.eval_flip_test}, amp {train.amp}; {outside['boxes']} of {outside['all']} "
          f"detections (top-K, every score) reach past their image")
    print(f"{'':8} {'clipped':>9} {'unclipped':>10} {'difference':>11}")
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        clipped, plain = stats["clipped"][key], stats["unclipped"][key]
        print(f"{key:8} {clipped:9.4f} {plain:10.4f} {clipped - plain:+11.4f}")


if __name__ == "__main__":
    main()
