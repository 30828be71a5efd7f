"""Read and validate a COCO instances json into per-image records with contiguous class indices.

Nothing here crashes on bad annotations: crowd boxes are excluded, boxes are clipped to the image
or dropped, annotations of unknown images or categories are dropped, and every such case is
counted in :class:`CocoReport`. A json without the required structure raises
:class:`CocoFormatError` naming what is missing.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from centernet_ray import storage
from centernet_ray.errors import UserInputError

log = logging.getLogger(__name__)


class CocoFormatError(UserInputError):
    """The annotation file is not a usable COCO instances json."""


@dataclass
class CocoReport:
    images: int = 0
    annotations: int = 0  # annotations kept as targets
    crowd_skipped: int = 0
    clipped: int = 0  # boxes partly outside their image, clipped to it
    dropped_invalid: int = 0  # NaN, zero/negative size, or entirely outside the image
    unknown_category: int = 0
    unknown_image: int = 0
    missing_images: int = 0  # image files absent from the images directory
    unreadable_images: int = 0  # present but not decodable (corrupt, truncated, not an image)
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few ids per problem, for the log

    def note(self, problem: str, what: str, keep: int = 5) -> None:
        setattr(self, problem, getattr(self, problem) + 1)
        samples = self.examples.setdefault(problem, [])
        if len(samples) < keep:
            samples.append(what)

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, int)}

    def summary(self) -> str:
        text = ", ".join(f"{k}={v}" for k, v in self.counts().items())
        problems = "; ".join(f"{k}: {', '.join(v)}" for k, v in self.examples.items())
        return text + (f" (e.g. {problems})" if problems else "")


@dataclass
class ImageRecord:
    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] x1, y1, x2, y2 in image pixels
    labels: np.ndarray  # int64 [N] contiguous class indices


@dataclass
class CocoDataset:
    images: list[ImageRecord]
    category_ids: list[int]  # contiguous index -> COCO category id
    class_names: list[str]
    report: CocoReport
    annotation_file: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)


def _require(mapping: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(mapping, dict):
        raise CocoFormatError(f"{where} must be a JSON object, got {type(mapping).__name__}")
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise CocoFormatError(f"{where} is missing required key(s) {missing}")


def parse_coco(data: dict[str, Any], source: str = "<dict>") -> CocoDataset:
    """Validate an already-parsed instances json and turn it into a :class:`CocoDataset`."""
    _require(data, ("images", "annotations", "categories"), f"{source}")
    for key in ("images", "annotations"):
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{source}: '{key}' must be a list, got {type(data[key]).__name__}")
    report = CocoReport()

    categories = data["categories"]
    if not isinstance(categories, list) or not categories:
        raise CocoFormatError(f"{source}: 'categories' must be a non-empty list")
    for i, cat in enumerate(categories):
        _require(cat, ("id", "name"), f"{source}: categories[{i}]")
    categories = sorted(({**cat, "id": _coco_id(cat["id"], f"{source}: categories[{i}] ({cat['name']!r})")}
                         for i, cat in enumerate(categories)), key=lambda c: c["id"])
    category_ids = [c["id"] for c in categories]
    if len(set(category_ids)) != len(category_ids):
        raise CocoFormatError(f"{source}: duplicate category ids in 'categories'")
    cat_index = {cat: i for i, cat in enumerate(category_ids)}

    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        img = _checked_image(img, f"{source}: images[{i}]")
        first = images.setdefault(img["id"], img)
        if first is not img:  # the annotations of that id could belong to either file
            raise CocoFormatError(f"{source}: images[{i}] ({img['file_name']}) has the id {img['id']} of "
                                  f"{first['file_name']}: image ids must be unique")
    boxes: dict[int, list[list[float]]] = {image_id: [] for image_id in images}
    labels: dict[int, list[int]] = {image_id: [] for image_id in images}

    for i, ann in enumerate(data["annotations"]):
        _require(ann, ("image_id", "bbox", "category_id"), f"{source}: annotations[{i}]")
        ann_id = str(ann.get("id", f"#{i}"))
        if ann.get("iscrowd", 0) not in (0, 1):  # "0" would be a crowd here and not in pycocotools' IoU
            raise CocoFormatError(f"{source}: annotations[{i}] (id {ann_id}) has iscrowd {ann['iscrowd']!r}: it "
                                  "must be 0 or 1")
        if ann.get("iscrowd", 0):
            report.note("crowd_skipped", ann_id)
            continue
        image_id, category_id = coco_id(ann["image_id"]), coco_id(ann["category_id"])
        image = images.get(image_id)
        if image is None:
            report.note("unknown_image", f"{ann_id} (image_id={ann['image_id']!r})")
            continue
        if category_id not in cat_index:
            report.note("unknown_category", f"{ann_id} (category_id={ann['category_id']!r})")
            continue
        box = _clean_box(ann["bbox"], float(image["width"]), float(image["height"]), report, ann_id)
        if box is None:
            continue
        boxes[image_id].append(box)
        labels[image_id].append(cat_index[category_id])
        report.annotations += 1
    dropped = {kind: getattr(report, kind) for kind in ("dropped_invalid", "unknown_category", "unknown_image")
               if getattr(report, kind)}
    if dropped and not report.annotations:
        why = "; ".join(f"{kind}={count}, e.g. {', '.join(report.examples[kind][:3])}"
                        for kind, count in dropped.items())
        raise CocoFormatError(
            f"{source}: none of its {len(data['annotations'])} annotations is usable ({why}): nothing to train on or "
            "score against. Each needs an image_id and a category_id among the file's ids, and a bbox [x, y, width, "
            "height] in pixels inside its image")

    records = [
        ImageRecord(
            image_id=image_id, file_name=img["file_name"], width=int(img["width"]), height=int(img["height"]),
            boxes=np.asarray(boxes[image_id], dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels[image_id], dtype=np.int64),
        )
        for image_id, img in images.items()
    ]
    report.images = len(records)
    return CocoDataset(records, category_ids, [str(c["name"]) for c in categories], report, source)


def coco_id(value: Any) -> int | None:
    """``value`` as a COCO id (a JSON integer, or a float holding one, within int64, as the Parquet
    shards store it), else None. Not a string holding one: pycocotools, which scores against the
    file as it is, would not match ``"1"`` to ``1``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2 ** 63:
        return None
    return value


def finite_number(value: Any) -> bool:
    """Whether ``value`` is a JSON number a float holds (not a bool, NaN, an infinity or an integer
    of hundreds of digits)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _coco_id(value: Any, where: str) -> int:
    number = coco_id(value)
    if number is None:
        raise CocoFormatError(f"{where} has the id {value!r:.40}: COCO ids are JSON integers (within 64 bits)")
    return number


def _checked_image(img: Any, where: str) -> dict[str, Any]:
    """An ``images`` entry, its id an int, or a :class:`CocoFormatError` naming what is wrong (a
    traceback from deep in the ingest, before)."""
    _require(img, ("id", "file_name", "width", "height"), where)
    if not isinstance(img["file_name"], str) or not img["file_name"]:
        raise CocoFormatError(f"{where} has the file_name {img['file_name']!r}: it must be the image's path relative "
                              "to the image folder")
    where = f"{where} ({img['file_name']})"
    for key in ("width", "height"):
        size = img[key]
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 < size < 2 ** 31:  # Parquet's int32
            raise CocoFormatError(f"{where} has the {key} {size!r:.40}: it must be the image's {key} in pixels")
    return {**img, "id": _coco_id(img["id"], where)}


def _clean_box(bbox: Any, width: float, height: float, report: CocoReport, ann_id: str) -> list[float] | None:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2] clipped to the image, or None (counted) when unusable."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError, OverflowError):  # not four numbers; an integer of hundreds of digits
        report.note("dropped_invalid", f"{ann_id} (bbox={bbox!r:.80})")
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        report.note("dropped_invalid", f"{ann_id} (bbox={bbox!r:.80})")
        return None
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if x2 <= x1 or y2 <= y1:
        report.note("dropped_invalid", f"{ann_id} (outside the image)")
        return None
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        report.note("clipped", ann_id)
    return [x1, y1, x2, y2]


def _presence_check(images_dir: str) -> Callable[[str], bool]:
    """Whether an image ``file_name`` exists under ``images_dir``: a check per file on a local disk;
    in object storage, one listing for the names inside the folder (a check per file would be a
    request per file), a check for those that point out of it (``../``)."""
    if not storage.is_uri(images_dir):
        root = Path(images_dir)
        return lambda name: (root / name).is_file()
    listed = storage.file_names(images_dir)

    def is_present(name: str) -> bool:
        normal = posixpath.normpath(name)
        if normal.startswith(("../", "/")):
            try:
                return storage.is_file(storage.join(images_dir, name))
            except UserInputError:  # it climbs out of the bucket: counted as missing
                return False
        return normal in listed

    return is_present


def no_images_found(annotation_file: str, names: list[str], images_dir: str,
                    files: Collection[str] | None = None) -> UserInputError:
    """The error for an image folder that holds none of the file ``names`` (at least one) that an
    annotation file lists: mistyped, a file, another split's or another dataset's. ``files``: the
    folder's listing, when the caller has it."""
    kind = "folder" if files else storage.kind(images_dir)
    if kind is None:
        where = f"the image folder {images_dir} does not exist"
    elif kind == "file":
        where = f"{images_dir} is a file, not a folder"
    else:
        files = files or storage.file_names(images_dir)
        where = (f"{images_dir} holds none of them ({len(files)} file{'s' * (len(files) > 1)}, e.g. {min(files)})"
                 if files else f"{images_dir} is empty")
    return UserInputError(f"{annotation_file} lists {len(names)} images (e.g. {names[0]}) and {where}. Is it the "
                          "right image folder?")


def read_coco_json(annotation_file: str | Path) -> dict[str, Any]:
    """The parsed instances json at a path or URI; absent or not JSON: a :class:`CocoFormatError`."""
    path = str(annotation_file)
    if not storage.is_file(path):
        raise CocoFormatError(f"annotation file not found: {path}")
    try:
        return json.loads(storage.read_bytes(path))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, or an integer beyond Python's digit limit
        raise CocoFormatError(f"{path} is not valid JSON: {exc}") from exc


def load_coco(annotation_file: str | Path, images_dir: str | Path | None = None) -> CocoDataset:
    """Read an instances json (a path or a URI); with ``images_dir``, images whose file is absent
    are dropped and counted."""
    path = str(annotation_file)
    dataset = parse_coco(read_coco_json(path), path)
    if images_dir is not None:
        is_present = _presence_check(str(images_dir))
        present = []
        for record in dataset.images:
            if is_present(record.file_name):
                present.append(record)
            else:
                dataset.report.note("missing_images", record.file_name)
                dataset.report.annotations -= len(record.labels)
        if dataset.images and not present:
            raise no_images_found(path, [record.file_name for record in dataset.images], str(images_dir))
        dataset.images = present
        dataset.report.images = len(present)
    level = logging.WARNING if any(dataset.report.examples) else logging.INFO
    log.log(level, "%s: %s", path, dataset.report.summary())
    return dataset


def drop_unreadable_images(dataset: CocoDataset, images_dir: str, num_threads: int = 16) -> None:
    """Read every image of ``dataset`` under ``images_dir`` (``num_threads`` at a time: object storage
    is latency-bound) and check that it decodes, as the ingest does: those that do not are dropped
    with their annotations and counted (``unreadable_images``, with examples). Progress is logged
    every tenth of the images."""
    from centernet_ray.data.image_check import read_checked_image  # Pillow: only for this reading

    def problem(record: ImageRecord) -> str | None:
        return read_checked_image(storage.join(images_dir, record.file_name))[1]

    total, kept = len(dataset.images), []
    step = max(1, total // 10)
    log.info("reading the %d images under %s to check that each decodes (%d at a time)", total, images_dir,
             num_threads)
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for done, (record, found) in enumerate(zip(dataset.images, pool.map(problem, dataset.images)), start=1):
            if found is None:
                kept.append(record)
            else:
                dataset.report.note("unreadable_images", f"{record.file_name} ({found[:80]})")
                dataset.report.annotations -= len(record.labels)
            if done % step == 0 or done == total:
                log.info("read %d/%d images, %d unreadable", done, total, done - len(kept))
    dataset.images = kept
    dataset.report.images = len(kept)
