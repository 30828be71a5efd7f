"""The evaluation pass: detect on this process's share of the validation batches, gather every
process's detections when a process group is up, score them with COCOeval on one process.

Batches are what the pipeline's collate yields (``image`` uint8 [B, 3, H_in, W_in], ``image_id``
[B], ``input_to_original`` [B, 2, 3], ``original_size`` [B, 2], optionally ``targets``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from centernet_ray.detector import Detections, Detector
from centernet_ray.evaluation.coco import (CocoEvaluation, coco_evaluation, coco_from_dict, confusion_matrix,
                                           detections_to_coco)
from centernet_ray.training.engine import distributed

log = logging.getLogger(__name__)

EVAL_TOP_K = 100  # detections per image scored by COCOeval, all of them (the official protocol)


@dataclass
class KeptImage:
    """A validation image kept for pictures, with what the model made of it."""

    image: torch.Tensor  # uint8 [3, H_in, W_in], letterboxed input
    input_to_original: torch.Tensor  # [2, 3]
    detections: Detections  # in original-image pixels
    true_heatmap: torch.Tensor | None  # [C, H, W] the training target, when the batch carries targets
    predicted_heatmap: torch.Tensor  # [C, H, W] sigmoid probabilities


@dataclass
class EvaluationResult:
    stats: dict[str, float]  # the 12 COCO stats + eval_images on the scoring process, else {}
    kept: list[KeptImage]  # up to keep_images of this process's first images
    coco: CocoEvaluation | None = None  # on the scoring process: per-class precision
    confusion: np.ndarray | None = None  # on the scoring process: [K + 1, K + 1] (evaluation.confusion_matrix)


def evaluate(detector: Detector, batches: Iterable[dict[str, Any]], category_ids: list[int],
             ground_truth: dict[str, Any] | None, keep_images: int = 0) -> EvaluationResult:
    """COCO evaluation pass: detect on this process's share of the validation batches (the top
    ``EVAL_TOP_K`` detections per image, no score threshold, as the official protocol), gather every
    process's detections when a process group is up, and score them with COCOeval on the process
    that holds ``ground_truth`` (the instances dict); the others get empty stats."""
    results, image_ids, kept = [], [], []
    for batch in batches:
        found = detector.detect(batch["image"], batch["input_to_original"], batch["original_size"], k=EVAL_TOP_K)
        ids = batch["image_id"].tolist()
        image_ids += ids
        for image_id, det in zip(ids, found):
            results += detections_to_coco([image_id], det.boxes[None], det.scores[None], det.classes[None], category_ids)
        take = min(len(found), keep_images - len(kept))
        if take > 0:
            heatmaps = detector.raw_outputs(batch["image"][:take])["heatmap"].cpu()
            true = batch.get("targets", {}).get("heatmap")
            kept += [KeptImage(batch["image"][j], batch["input_to_original"][j], found[j],
                               None if true is None else true[j], heatmaps[j]) for j in range(take)]
    return _gather_and_score(results, image_ids, ground_truth, category_ids, kept)


def _gather_and_score(results: list[dict], image_ids: list[int], ground_truth: dict | None, category_ids: list[int],
                      kept: list[KeptImage]) -> EvaluationResult:
    if distributed():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (results, image_ids))
        results = [r for part in gathered for r in part[0]]
        image_ids = [i for part in gathered for i in part[1]]
    if ground_truth is None:
        return EvaluationResult({}, kept)
    duplicates = len(image_ids) - len(set(image_ids))
    if duplicates:
        log.warning("evaluation saw %d image(s) more than once", duplicates)
    coco, evaluated = coco_from_dict(ground_truth), sorted(set(image_ids))
    scored = coco_evaluation(coco, results, image_ids=evaluated)
    stats = {**scored.stats, "eval_images": float(len(evaluated))}
    return EvaluationResult(stats, kept, scored, confusion_matrix(coco, results, category_ids, evaluated))

