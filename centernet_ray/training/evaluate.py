"""Distributed evaluation inside Ray Train workers: each rank detects on its share of the
validation images, detections are gathered, rank 0 runs COCOeval."""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch.distributed as dist

from centernet_ray.evaluation import coco_evaluate, coco_from_dict, detections_to_coco
from centernet_ray.inference import Detector

log = logging.getLogger(__name__)


def detect_shard(detector: Detector, batches: Iterable[dict[str, Any]], category_ids: list[int],
                 keep_images: int = 0) -> tuple[list[dict], list[int], list[tuple]]:
    """COCO results for every image of ``batches``, the image ids seen, and up to ``keep_images``
    (image, detections) pairs for drawing."""
    results, image_ids, kept = [], [], []
    for batch in batches:
        found = detector.detect(batch["image"], batch["input_to_original"], batch["original_size"], k=100,
                                score_threshold=0.001)
        ids = batch["image_id"].tolist()
        image_ids += ids
        for image_id, det in zip(ids, found):
            results += detections_to_coco([image_id], det.boxes[None], det.scores[None], det.classes[None], category_ids)
        for j in range(min(len(found), keep_images - len(kept))):
            kept.append((batch["image"][j], batch["input_to_original"][j], found[j]))
    return results, image_ids, kept


def gather_and_score(results: list[dict], image_ids: list[int], ground_truth: dict | None) -> dict[str, float]:
    """All ranks' detections gathered; COCO stats computed on rank 0 (other ranks get {})."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (results, image_ids))
        results = [r for part in gathered for r in part[0]]
        image_ids = [i for part in gathered for i in part[1]]
    if ground_truth is None:
        return {}
    duplicates = len(image_ids) - len(set(image_ids))
    if duplicates:
        log.warning("evaluation saw %d image(s) more than once", duplicates)
    stats = coco_evaluate(coco_from_dict(ground_truth), results, image_ids=sorted(set(image_ids)))
    stats["eval_images"] = float(len(set(image_ids)))
    return stats

