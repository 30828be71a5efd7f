"""Is the exported graph the same detector? Parity with PyTorch image by image, and COCO AP of both
on the validation set.

Tolerances (float32 on both sides; the differences are rounding in the convolutions' summation
order, measured at ~1e-6 in scores): a detection's score within ``SCORE_ATOL`` and its box within
``BOX_ATOL`` original-image pixels of its PyTorch twin (same class), and the two COCO APs within
``AP_ATOL``. Detections whose score ties with the K-th (the last one kept) may legitimately be
others in the two runtimes (top-K breaks ties by position in its own order), so only those
scoring above the K-th plus the tolerance are matched. Rounding can also flip a 3x3 peak whose
neighbour scores within ~1e-7 of it, so up to ``MAX_UNMATCHED_FRACTION`` of the compared
detections, and one in any case, may lack a twin (the demo model: 0 of 19,558; a one-epoch model of
the job test, its heatmaps still flat: 1 of 986, where the fraction alone allowed none). A check
that compared no detection at all (every score tied, as a collapsed model's are) fails: it would
show nothing.

Validation images that are missing or unreadable are skipped and counted, as training's evaluation
skips what ingest dropped; other read failures (object storage timing out) stop the check.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from centernet_ray import storage
from centernet_ray.checkpoint import LoadedModel
from centernet_ray.data.coco import coco_id, load_coco
from centernet_ray.data.images import ImageDecodeError, decode_image
from centernet_ray.data.sources import split_sources
from centernet_ray.detector import Detections, Detector, letterbox_batch
from centernet_ray.evaluation.evaluate import EVAL_TOP_K, evaluate
from centernet_ray.export.runtime import OnnxDetector

log = logging.getLogger(__name__)

SCORE_ATOL = 1e-4
BOX_ATOL = 0.05  # original-image pixels
AP_ATOL = 0.005
MAX_UNMATCHED_FRACTION = 0.001


@dataclass
class ExportCheck:
    """The outcome of ``check_export``: what was compared, the largest differences, both APs."""

    images: int
    matched_detections: int
    max_score_diff: float
    max_box_diff: float
    unmatched: int  # detections above the tie boundary without a twin (0 when parity holds)
    torch_ap: float
    onnx_ap: float
    torch_ap50: float
    onnx_ap50: float
    torch_ms_per_image: float
    onnx_ms_per_image: float
    passed: bool
    reason: str  # why it failed, or "" when it passed
    skipped_images: int = 0  # missing or unreadable validation images, left out of both sides

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "tolerances": {"score": SCORE_ATOL, "box_px": BOX_ATOL, "ap": AP_ATOL,
                                               "unmatched_fraction": MAX_UNMATCHED_FRACTION}}

    def metrics(self) -> dict[str, float]:
        """For MLflow: export/torch_AP, export/onnx_AP, export/max_score_diff, ..."""
        names = ("max_score_diff", "max_box_diff", "unmatched", "torch_ap", "onnx_ap", "torch_ap50", "onnx_ap50",
                 "torch_ms_per_image", "onnx_ms_per_image")
        return {f"export/{name.replace('_ap', '_AP')}": float(getattr(self, name)) for name in names} | \
            {"export/passed": float(self.passed)}


def match_detections(reference: Detections, candidate: Detections) -> tuple[int, float, float, int]:
    """Pair each reference detection above the tie boundary with the candidate detection of the same
    class nearest to it. Returns (pairs, max |score diff|, max |box diff| in pixels, unmatched)."""
    if len(reference.scores) == 0 or len(candidate.scores) == 0:
        return 0, 0.0, 0.0, abs(len(reference.scores) - len(candidate.scores))
    boundary = min(reference.scores.min(), candidate.scores.min()) + SCORE_ATOL
    free = np.ones(len(candidate.scores), dtype=bool)
    pairs, worst_score, worst_box, unmatched = 0, 0.0, 0.0, 0
    for i in np.flatnonzero(reference.scores > boundary):
        score_diff = np.abs(candidate.scores - reference.scores[i])
        box_diff = np.abs(candidate.boxes - reference.boxes[i]).max(axis=1) if len(candidate.boxes) else score_diff
        fits = free & (candidate.classes == reference.classes[i]) & (score_diff <= SCORE_ATOL) & (box_diff <= BOX_ATOL)
        if not fits.any():
            unmatched += 1
            continue
        j = np.flatnonzero(fits)[np.argmin((score_diff + box_diff)[fits])]
        free[j] = False
        pairs += 1
        worst_score, worst_box = max(worst_score, float(score_diff[j])), max(worst_box, float(box_diff[j]))
    # candidates clearly above the boundary that no reference detection took (near it, a twin may sit just below)
    unmatched += int((free & (candidate.scores > boundary + SCORE_ATOL)).sum())
    return pairs, worst_score, worst_box, unmatched


def validation_batches(loaded: LoadedModel, batch_size: int = 16, max_images: int | None = None,
                       images: str | None = None, annotations: str | None = None,
                       skipped: list[str] | None = None) -> tuple[Iterator[dict], dict]:
    """The validation set of the checkpoint's config (or ``images``/``annotations``), letterboxed in
    this process: (batches as the pipeline's collate yields them, the instances dict). Missing or
    unreadable images are left out with a warning and appended to ``skipped`` as they are met."""
    if not (images and annotations):
        source = split_sources(loaded.config.data)["val"]
        images, annotations = source.images, source.annotations
    dataset = load_coco(annotations)
    instances = json.loads(storage.read_bytes(annotations))
    records = dataset.images[:max_images] if max_images else dataset.images
    if max_images:
        kept = {r.image_id for r in records}
        instances = {**instances, "images": [i for i in instances["images"] if i["id"] in kept],
                     "annotations": [a for a in instances.get("annotations", [])
                                     if coco_id(a["image_id"]) in kept]}

    def batches() -> Iterator[dict]:
        for start in range(0, len(records), batch_size):
            pictures, image_ids = [], []
            for record in records[start:start + batch_size]:
                try:
                    pictures.append(decode_image(storage.read_bytes(storage.join(images, record.file_name))))
                except (OSError, ImageDecodeError) as exc:  # missing, a folder, unreadable
                    log.warning("validation image %s skipped: %s", record.file_name, exc)
                    if skipped is not None:
                        skipped.append(record.file_name)
                    continue
                image_ids.append(record.image_id)
            if not pictures:
                continue
            batch = letterbox_batch(pictures, loaded.config.data.input_size)
            yield {"image": batch.images, "input_to_original": batch.input_to_original,
                   "original_size": batch.original_size, "image_id": torch.tensor(image_ids)}

    return batches(), instances


def allowed_unmatched(compared: int) -> int:
    """How many of ``compared`` detections may lack a twin: ``MAX_UNMATCHED_FRACTION`` of them, and one
    in any case (a single rounding flip; a wrong graph leaves many detections without one)."""
    return max(1, int(MAX_UNMATCHED_FRACTION * compared))


def failure_reason(images: int, skipped: int, pairs: int, unmatched: int, torch_ap: float, onnx_ap: float) -> str:
    """Why the check fails ("" when it passes): no image read, nothing compared, more detections
    without a twin than :func:`allowed_unmatched`, or APs further apart than ``AP_ATOL``."""
    if images == 0:
        return f"no readable validation image ({skipped} skipped)"
    if pairs + unmatched == 0:
        return ("no detection scored above the tie at the K-th score: nothing was compared "
                "(a model whose scores are all equal)")
    if unmatched > allowed_unmatched(pairs + unmatched):
        return (f"{unmatched} of {pairs + unmatched} detections have no ONNX twin within score {SCORE_ATOL} "
                f"and {BOX_ATOL} px (at most {MAX_UNMATCHED_FRACTION:.1%}, and one, may)")
    if abs(torch_ap - onnx_ap) > AP_ATOL:
        return f"ONNX AP {onnx_ap:.4f} differs from PyTorch's {torch_ap:.4f} by more than {AP_ATOL}"
    return ""


class _Timed:
    """Wraps a detector's ``detect``: at most ``k`` detections (the graph's K, for both sides), its
    time added up, each batch's detections kept for the parity check."""

    def __init__(self, detector: Any, k: int) -> None:
        self.detector, self.k, self.seconds, self.images, self.found = detector, k, 0.0, 0, []

    def detect(self, images: torch.Tensor, *args: Any, k: int = EVAL_TOP_K, **kwargs: Any) -> list[Detections]:
        started = time.perf_counter()
        found = self.detector.detect(images, *args, k=min(k, self.k), **kwargs)
        self.seconds += time.perf_counter() - started
        self.images += len(found)
        self.found += found
        return found


def check_export(loaded: LoadedModel, onnx_path: str | Path, batch_size: int = 16, max_images: int | None = None,
                 images: str | None = None, annotations: str | None = None) -> ExportCheck:
    """Run PyTorch (float32, this process's CPU) and the ONNX file on the validation set; compare."""
    exported = OnnxDetector(onnx_path)
    torch_side = _Timed(Detector(loaded.model.float(), loaded.config.data.input_size, "cpu"), exported.max_detections)
    onnx_side = _Timed(exported, exported.max_detections)
    results, skipped = {}, []
    for name, side in (("torch", torch_side), ("onnx", onnx_side)):
        batches, instances = validation_batches(loaded, batch_size, max_images, images, annotations,
                                                skipped if name == "torch" else None)
        results[name] = evaluate(side, batches, loaded.category_ids, instances).stats
        log.info("%s: AP %.4f on %d images (%.1f ms/image)", name, results[name]["AP"], side.images,
                 1e3 * side.seconds / max(side.images, 1))
    pairs = score_diff = box_diff = unmatched = 0
    for ours, theirs in zip(torch_side.found, onnx_side.found):
        p, s, b, u = match_detections(ours, theirs)
        pairs, unmatched = pairs + p, unmatched + u
        score_diff, box_diff = max(score_diff, s), max(box_diff, b)
    reason = failure_reason(torch_side.images, len(skipped), pairs, unmatched, results["torch"]["AP"],
                            results["onnx"]["AP"])
    return ExportCheck(torch_side.images, pairs, score_diff, box_diff, unmatched, results["torch"]["AP"],
                       results["onnx"]["AP"], results["torch"]["AP50"], results["onnx"]["AP50"],
                       1e3 * torch_side.seconds / max(torch_side.images, 1),
                       1e3 * onnx_side.seconds / max(onnx_side.images, 1), not reason, reason, len(skipped))
