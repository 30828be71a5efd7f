"""COCO evaluation: decoded detections -> COCO results json entries -> pycocotools COCOeval."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

log = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def detections_to_coco(image_ids: Sequence[int], boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                       category_ids: Sequence[int], score_threshold: float = 0.0) -> list[dict[str, Any]]:
    """COCO results entries for a batch of images.

    Args:
        image_ids: [B] COCO image ids.
        boxes: [B, K, 4] x1, y1, x2, y2 in original-image pixels; scores [B, K]; classes [B, K]
            contiguous class indices, mapped to COCO ids through ``category_ids``.
    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``
    """
    boxes, scores, classes = np.asarray(boxes, dtype=np.float64), np.asarray(scores), np.asarray(classes)
    lookup = np.asarray(category_ids)
    results = []
    for b, image_id in enumerate(image_ids):
        keep = scores[b] > score_threshold
        xywh = boxes[b][keep].copy()
        xywh[:, 2:] -= xywh[:, :2]
        for box, score, cls in zip(xywh, scores[b][keep], classes[b][keep]):
            results.append({"image_id": int(image_id), "category_id": int(lookup[cls]),
                            "bbox": [float(v) for v in box], "score": float(score)})  # unrounded: Serve parity
    return results


def coco_from_dict(instances: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` index built from an in-memory instances dict, without its prints."""
    coco = COCO()
    coco.dataset = instances
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(ground_truth: COCO | str, detections: list[dict[str, Any]],
                  image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """The 12 standard COCO box stats by name (``AP`` ... ``ARl``) for ``detections``.

    ``ground_truth`` is a ``COCO`` object or the path of an instances json; ``image_ids`` limits
    the evaluation to those images (default: all). No detections scores 0 everywhere.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if not detections:
        log.warning("no detections to evaluate: every COCO stat is 0")
        return {name: 0.0 for name in STAT_NAMES}
    known = set(gt.getImgIds())
    unknown = {d["image_id"] for d in detections} - known
    if unknown:
        raise ValueError(f"detections refer to image ids absent from the ground truth: {sorted(unknown)[:5]}")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("COCO evaluation:\n%s", buffer.getvalue().strip())
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}


def format_stats(stats: dict[str, float]) -> str:
    """One line per stat, aligned, for terminal summaries."""
    return "\n".join(f"{name:>6}  {stats[name]:.4f}" for name in STAT_NAMES if name in stats)
