"""Deterministic synthetic "shapes" detection dataset written in the standard COCO layout.

Four classes told apart by shape only (colours are random for every object): circle, rectangle,
triangle, cross. Each image holds 1-6 objects from ~8 px to half the image side, some partly
overlapping, on a noisy background with a colour gradient and distractor strokes.

Layout: ``DIR/images/{train,val}/*.jpg`` and ``DIR/annotations/instances_{train,val}.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from centernet_ray import storage

log = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "rectangle", "triangle", "cross")
MAX_OVERLAP_IOU = 0.3
GENERATOR_VERSION = 1  # bump when the images change, so cached copies are regenerated
MAX_THREADS = 8  # drawing threads: numpy's and Pillow's C code releases the GIL for most of an image


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    angle = rng.uniform(0, 2 * np.pi)
    # a linear colour gradient in a random direction, plus pixel noise
    t = np.clip(0.5 + (np.cos(angle) * (ramp - 0.5) + np.sin(angle) * (ramp.transpose(1, 0, 2) - 0.5)), 0, 1)
    pixels = start * (1 - t) + end * t + rng.normal(0, rng.uniform(4, 20), (size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 5)):  # distractor strokes: thin lines are not objects
        points = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
        draw.line(points, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: np.ndarray, colour: tuple[int, ...],
                rng: np.random.Generator) -> None:
    # PIL coordinates are inclusive pixel indices; the COCO box [x1, x2) covers pixels x1..x2-1.
    x1, y1, x2, y2 = (int(v) for v in box)
    right, bottom = x2 - 1, y2 - 1
    if shape == "circle":
        draw.ellipse([x1, y1, right, bottom], fill=colour)
    elif shape == "rectangle":
        draw.rectangle([x1, y1, right, bottom], fill=colour)
    elif shape == "triangle":
        apex = int(rng.integers(x1, right + 1))
        draw.polygon([(x1, bottom), (right, bottom), (apex, y1)], fill=colour)
    elif shape == "cross":
        w, h = x2 - x1, y2 - y1
        tw, th = max(2, w // 3), max(2, h // 3)
        cx, cy = x1 + (w - tw) // 2, y1 + (h - th) // 2
        draw.rectangle([cx, y1, cx + tw - 1, bottom], fill=colour)
        draw.rectangle([x1, cy, right, cy + th - 1], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_image(seed: int, split: str, index: int, size: int) -> tuple[Image.Image, list[np.ndarray], list[int]]:
    """One synthetic image and its boxes ([x1, y1, x2, y2] integer pixels) and class indices."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    min_side, max_side = 8, max(9, size // 2)
    for _ in range(int(rng.integers(1, 7))):
        for _attempt in range(30):
            side = np.exp(rng.uniform(np.log(min_side), np.log(max_side)))  # log-uniform sizes
            aspect = np.exp(rng.uniform(np.log(0.6), np.log(1.6)))
            w = int(np.clip(round(side * np.sqrt(aspect)), min_side, max_side))
            h = int(np.clip(round(side / np.sqrt(aspect)), min_side, max_side))
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = np.array([x, y, x + w, y + h], dtype=np.float32)
            if all(_iou(box, other) <= MAX_OVERLAP_IOU for other in boxes):
                break
        else:
            continue
        label = int(rng.integers(0, len(SHAPE_CLASSES)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        _draw_shape(draw, SHAPE_CLASSES[label], box, colour, rng)
        boxes.append(box)
        labels.append(label)
    return image, boxes, labels


def _draw_and_save(seed: int, split: str, index: int, size: int, image_dir: str) -> tuple[list[list[float]], list[int]]:
    """Render image ``index`` of ``split`` and write it as ``image_dir/NNNNNN.jpg``; its boxes and labels."""
    image, boxes, labels = render_image(seed, split, index, size)
    image.save(Path(image_dir) / f"{index:06d}.jpg", quality=90)
    return [box.tolist() for box in boxes], labels


def _drawn(seed: int, split: str, count: int, size: int, image_dir: Path,
           threads: int) -> Iterator[tuple[list[list[float]], list[int]]]:
    """The images of ``split`` drawn and written by ``threads`` threads, returned in index order
    (each image has its own seed: the files are the same however many threads draw them)."""
    draw = functools.partial(_draw_and_save, seed, split, size=size, image_dir=str(image_dir))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        yield from pool.map(draw, range(count))


def write_shapes_dataset(out_dir: str | Path, num_train: int = 1000, num_val: int = 200,
                         image_size: int = 128, seed: int = 0, threads: int | None = None) -> Path:
    """Write the dataset to ``out_dir`` (created; existing files of the same names are replaced),
    drawing with ``threads`` threads (default: one per core, at most ``MAX_THREADS``; 1.5x faster
    with 2 than with 1 on a 2-core VM, BENCHMARKS.md)."""
    out = Path(out_dir)
    threads = threads if threads is not None else min(MAX_THREADS, os.cpu_count() or 1)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]
    for split, count in (("train", num_train), ("val", num_val)):
        image_dir = out / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index, (boxes, labels) in enumerate(_drawn(seed, split, count, image_size, image_dir, threads)):
            image_id = index + 1
            images.append({"id": image_id, "file_name": f"{index:06d}.jpg", "width": image_size, "height": image_size})
            for (x1, y1, x2, y2), label in zip(boxes, labels):
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                })
            if (index + 1) % 500 == 0:
                log.info("shapes %s: %d/%d images", split, index + 1, count)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        instances = {"images": images, "annotations": annotations, "categories": categories,
                     "info": {"description": f"centernet-ray synthetic shapes v{GENERATOR_VERSION}, seed {seed}"}}
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(instances))
    log.info("wrote shapes dataset (%d train, %d val, %d px) to %s", num_train, num_val, image_size, out)
    return out


def write_shapes_dataset_to(out: str | Path, num_train: int = 1000, num_val: int = 200, image_size: int = 128,
                            seed: int = 0) -> str:
    """:func:`write_shapes_dataset` to a folder or a URI (written in a temporary folder here, then
    copied there); returns where it is."""
    if not storage.is_uri(out):
        return str(write_shapes_dataset(out, num_train, num_val, image_size, seed))
    with tempfile.TemporaryDirectory(prefix="shapes-") as folder:
        write_shapes_dataset(folder, num_train, num_val, image_size, seed)
        storage.copy_folder(folder, out)
    return str(out)


def default_cache_dir() -> Path:
    return Path(os.environ.get("CENTERNET_RAY_CACHE", Path.home() / ".cache" / "centernet-ray"))


def ensure_shapes_dataset(num_train: int = 1000, num_val: int = 200, image_size: int = 128, seed: int = 0,
                          cache_dir: str | Path | None = None) -> Path:
    """The cached dataset for these parameters, generated on first use.

    Generation goes to a temporary directory that is renamed into place, so concurrent callers
    (several workers on one node) never see a half-written dataset.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    name = f"shapes-v{GENERATOR_VERSION}-n{num_train}-{num_val}-s{image_size}-seed{seed}"
    target = cache / name
    if (target / "annotations" / "instances_val.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log.info("generating the synthetic shapes dataset into %s (first use)", target)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        write_shapes_dataset(staging, num_train, num_val, image_size, seed)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "annotations" / "instances_val.json").is_file():
                raise  # not a lost race with another writer: a real error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
