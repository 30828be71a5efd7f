"""COCO evaluation: decoded detections -> COCO results json entries -> pycocotools COCOeval."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pycocotools.coco
import pycocotools.cocoeval
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from centernet_ray import storage
from centernet_ray.data.coco import coco_id, finite_number
from centernet_ray.errors import UserInputError

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
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``; boxes or scores that
        are not finite are left out.
    """
    boxes, scores, classes = np.asarray(boxes, dtype=np.float64), np.asarray(scores), np.asarray(classes)
    lookup = np.asarray(category_ids)
    results = []
    for b, image_id in enumerate(image_ids):
        # a box or score that is not finite (a diverging model) would match objects in COCOeval: NaN
        # compares as no IoU below the threshold, and such boxes raised the AP
        keep = (scores[b] > score_threshold) & np.isfinite(boxes[b]).all(axis=-1) & np.isfinite(scores[b])
        xywh = boxes[b][keep].copy()
        xywh[:, 2:] -= xywh[:, :2]
        for box, score, cls in zip(xywh, scores[b][keep], classes[b][keep]):
            results.append({"image_id": int(image_id), "category_id": int(lookup[cls]),
                            "bbox": [float(v) for v in box], "score": float(score)})  # unrounded: Serve parity
    return results


@contextlib.contextmanager
def _pycocotools_output(buffer: io.StringIO) -> Iterator[None]:
    """pycocotools' progress prints ("creating index...", the stats table) go to ``buffer``. Its
    modules get their own ``print``: redirecting stdout is not enough in a Ray Train worker, whose
    ``builtins.print`` Ray replaces with one that also logs every line."""
    def to_buffer(*objects: Any, sep: str = " ", end: str = "\n", **_: Any) -> None:
        buffer.write(sep.join(map(str, objects)) + end)

    modules = (pycocotools.coco, pycocotools.cocoeval)
    for module in modules:
        module.print = to_buffer  # a module global shadows the builtin for that module only
    try:
        yield
    finally:
        for module in modules:
            vars(module).pop("print", None)


def coco_from_dict(instances: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` index built from an in-memory instances dict (validated by
    ``parse_coco``), without its prints, over :func:`scorable_annotations` of it."""
    coco = COCO()
    coco.dataset = {**instances, "annotations": scorable_annotations(instances["annotations"])}
    with _pycocotools_output(io.StringIO()):
        coco.createIndex()
    return coco


def scorable_annotations(annotations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``annotations`` as COCOeval needs them, where files that training reads well lack
    it: the ``area`` of the box where none is given (COCOeval sorts objects into small, medium and
    large by it), ``iscrowd`` 0 where absent, and ids numbered 1..N (pycocotools keeps one object
    per id: a file whose ids repeat, or that has none, scored the wrong objects). Annotations
    without a box of four finite numbers are left out: pycocotools cannot match them, and training
    dropped them as invalid."""
    scorable, repeated, ids = [], 0, set()
    for annotation in annotations:
        box = annotation.get("bbox")
        if not (isinstance(box, (list, tuple)) and len(box) == 4
                and all(finite_number(v) for v in box)):
            continue
        repeated += annotation.get("id") in ids
        ids.add(annotation.get("id"))
        scorable.append({"area": float(box[2]) * float(box[3]), "iscrowd": 0, **annotation, "id": len(scorable) + 1})
    if repeated:
        log.warning("%d annotation(s) repeat the id of another: each is scored as an object of its own", repeated)
    return scorable


@dataclass
class CocoEvaluation:
    """The 12 stats plus COCOeval's accumulated precision, for per-class AP and precision-recall curves."""

    stats: dict[str, float]
    precision: np.ndarray  # [T, R, K]: IoU thresholds .50:.05:.95 x 101 recall points x classes, area "all",
    #                        100 detections per image; -1 where a class has no ground truth
    recall_points: np.ndarray  # [R] 0, 0.01, ..., 1
    iou_thresholds: np.ndarray  # [T]
    category_ids: list[int]  # [K] COCO ids in COCOeval's (sorted) order

    def class_ap(self, iou: float | None = None) -> np.ndarray:
        """[K] AP per class, averaged over IoU thresholds (``iou`` None) or at one of them (0.5, 0.75);
        NaN for a class without ground truth. The mean over classes is the AP stat."""
        precision = self.precision if iou is None else self.precision[self._iou_index(iou)][None]
        valid = precision > -1
        counts = valid.sum(axis=(0, 1))
        sums = np.where(valid, precision, 0.0).sum(axis=(0, 1))
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    def pr_curves(self, iou: float = 0.5) -> np.ndarray:
        """[R, K] interpolated precision at each recall point at IoU ``iou`` (NaN: class without ground truth)."""
        curves = self.precision[self._iou_index(iou)].astype(np.float64)
        return np.where(curves > -1, curves, np.nan)

    def _iou_index(self, iou: float) -> int:
        matches = np.flatnonzero(np.isclose(self.iou_thresholds, iou))
        if not len(matches):
            raise ValueError(f"IoU {iou} is not one of COCOeval's thresholds {self.iou_thresholds.tolist()}")
        return int(matches[0])


def check_detections(detections: list[Any], image_ids: set[int], category_ids: set[int], source: str) -> None:
    """Refuse, naming the first offender, a detection list COCOeval would choke on or score against
    nothing: entries without ``image_id``, ``category_id``, a 4-number ``bbox`` and a ``score``, or
    with an image or category id the ground truth lacks (``predict`` without ``--annotations`` numbers
    the images 1..N: such output cannot be scored against another file's ids)."""
    for i, detection in enumerate(detections):
        where = f"{source}: detection {i}"
        if not isinstance(detection, dict) or not {"image_id", "category_id", "bbox", "score"} <= detection.keys():
            raise UserInputError(f"{where} needs image_id, category_id, bbox and score; got {detection!r:.120}")
        box = detection["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(finite_number(v) for v in box)):
            raise UserInputError(f"{where}: bbox must be [x, y, width, height] of finite numbers; got {box!r:.80}")
        if not finite_number(detection["score"]):
            raise UserInputError(f"{where}: score must be a finite number; got {detection['score']!r:.40}")
        if any(coco_id(detection[key]) is None for key in ("image_id", "category_id")):
            raise UserInputError(f"{where}: image_id and category_id must be integers; got "
                                 f"{detection['image_id']!r:.40} and {detection['category_id']!r:.40}")
        if detection["image_id"] not in image_ids:
            raise UserInputError(f"{where} names image_id {detection['image_id']!r}, which the ground truth lacks "
                                 "(were they predicted with --annotations of this file?)")
        if detection["category_id"] not in category_ids:
            raise UserInputError(f"{where} names category_id {detection['category_id']!r}, which the ground truth "
                                 f"lacks (it has {sorted(category_ids)})")


def coco_evaluation(ground_truth: COCO | str, detections: list[dict[str, Any]],
                    image_ids: Sequence[int] | None = None) -> CocoEvaluation:
    """COCOeval of ``detections`` (see :func:`coco_evaluate`), keeping its precision array."""
    gt = coco_from_dict(json.loads(storage.read_bytes(ground_truth))) if isinstance(ground_truth, str) else ground_truth
    category_ids = sorted(gt.getCatIds())
    evaluated = list(gt.getImgIds() if image_ids is None else image_ids)
    if not detections and evaluated and category_ids:
        # pycocotools cannot load an empty result list. One detection that overlaps nothing (far outside
        # every image) scores exactly as none: no true positive, so precision and recall are 0 where
        # there are objects, and COCOeval's -1 (NaN per class) where there are none
        log.warning("no detections to evaluate: the stats are 0 where there are objects")
        detections = [{"image_id": evaluated[0], "category_id": category_ids[0], "bbox": [-1e6, -1e6, 1.0, 1.0],
                       "score": 1e-9}]
    elif not detections:
        iou_thresholds, recall_points = np.linspace(0.5, 0.95, 10), np.linspace(0.0, 1.0, 101)
        precision = -np.ones((len(iou_thresholds), len(recall_points), len(category_ids)))
        return CocoEvaluation({name: -1.0 for name in STAT_NAMES}, precision, recall_points, iou_thresholds,
                              category_ids)
    known = set(gt.getImgIds())
    unknown = {d["image_id"] for d in detections} - known
    if unknown:
        raise ValueError(f"detections refer to image ids absent from the ground truth: {sorted(unknown)[:5]}")
    buffer = io.StringIO()
    with _pycocotools_output(buffer):
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("COCO evaluation:\n%s", buffer.getvalue().strip())
    params = evaluator.params
    area, max_dets = params.areaRngLbl.index("all"), params.maxDets.index(100)
    return CocoEvaluation({name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)},
                          evaluator.eval["precision"][:, :, :, area, max_dets], np.asarray(params.recThrs),
                          np.asarray(params.iouThrs), list(params.catIds))


def coco_evaluate(ground_truth: COCO | str, detections: list[dict[str, Any]],
                  image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """The 12 standard COCO box stats by name (``AP`` ... ``ARl``) for ``detections``.

    ``ground_truth`` is a ``COCO`` object or the path (or URI) of an instances json; ``image_ids`` limits
    the evaluation to those images (default: all). No detections scores 0 everywhere.
    """
    return coco_evaluation(ground_truth, detections, image_ids).stats


def confusion_matrix(ground_truth: COCO, detections: list[dict[str, Any]], category_ids: Sequence[int],
                     image_ids: Sequence[int] | None = None, iou_threshold: float = 0.5,
                     score_threshold: float = 0.3) -> np.ndarray:
    """[K + 1, K + 1] counts: row = true class, column = predicted class, in ``category_ids`` order;
    the last row counts detections that match no object (background), the last column objects that
    no detection found (missed).

    Per image, detections scoring at least ``score_threshold`` are matched greedily, best score first,
    to the unmatched non-crowd object of highest IoU >= ``iou_threshold`` whatever its class (so a
    right box with the wrong class lands off the diagonal); a detection covering a crowd region is
    ignored, as COCOeval ignores it.
    """
    index = {int(c): i for i, c in enumerate(category_ids)}
    background = len(category_ids)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for d in detections:
        if d["score"] >= score_threshold:
            by_image.setdefault(int(d["image_id"]), []).append(d)
    for image_id in (ground_truth.getImgIds() if image_ids is None else image_ids):
        objects = ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=[image_id]))
        found = sorted(by_image.get(int(image_id), []), key=lambda d: -d["score"])
        real = [o for o in objects if not o.get("iscrowd", 0)]
        crowd = [o for o in objects if o.get("iscrowd", 0)]
        taken = np.zeros(len(real), dtype=bool)
        ious = _box_iou([d["bbox"] for d in found], [o["bbox"] for o in real], crowd=False)
        crowd_ious = _box_iou([d["bbox"] for d in found], [o["bbox"] for o in crowd], crowd=True)
        for i, det in enumerate(found):
            predicted = index[int(det["category_id"])]
            candidates = np.where(taken, -1.0, ious[i]) if len(real) else np.zeros(0)
            if len(candidates) and candidates.max() >= iou_threshold:
                j = int(candidates.argmax())
                taken[j] = True
                matrix[index[int(real[j]["category_id"])], predicted] += 1
            elif not (len(crowd) and crowd_ious[i].max() >= iou_threshold):
                matrix[background, predicted] += 1
        for j in np.flatnonzero(~taken):
            matrix[index[int(real[j]["category_id"])], background] += 1
    return matrix


def _box_iou(detected: list[list[float]], objects: list[list[float]], crowd: bool) -> np.ndarray:
    """[D, G] IoU of xywh boxes (pycocotools; against a crowd region: the share of the detection inside it)."""
    if not detected or not objects:
        return np.zeros((len(detected), len(objects)))
    return np.asarray(mask_utils.iou(detected, objects, [int(crowd)] * len(objects))).reshape(len(detected), len(objects))


def format_stats(stats: dict[str, float]) -> str:
    """One line per stat, aligned, for terminal summaries."""
    return "\n".join(f"{name:>6}  {stats[name]:.4f}" for name in STAT_NAMES if name in stats)
