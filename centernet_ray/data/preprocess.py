"""Batch preprocessing (Ray-free): Parquet rows -> fixed-shape network inputs + sparse targets.

``Preprocessor`` is the body of the Ray Data ``map_batches`` stage; it takes and returns numpy
batches, so it runs and tests without Ray. Targets leave it *sparse* (boxes in output-map pixels
and classes, padded to ``max_objects``): 3 KB per row instead of a 5 MB dense COCO heatmap
(BENCHMARKS.md). ``targets.render_targets`` makes them dense on the train worker.

Output batch (B rows that decoded; bad rows are dropped, logged and counted):
    image [B, 3, H_in, W_in] uint8; boxes [B, M, 4] float32 (output-map px, zero padded);
    classes [B, M] int32; num_boxes [B] int32; image_id [B] int64;
    input_to_original [B, 2, 3] float32; original_size [B, 2] int32 (width, height).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from centernet_ray import storage
from centernet_ray.config import LETTERBOX_PRESETS
from centernet_ray.data.images import ImageDecodeError, decode_image
from centernet_ray.data.transforms import Prepared, Preprocessed, TrainTransform, ValTransform
from centernet_ray.targets import OUTPUT_STRIDE

log = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, image_id: int) -> int:
    """Per-sample augmentation seed: the same (seed, epoch, image) always augments alike."""
    return int(np.random.SeedSequence([seed, epoch, image_id]).generate_state(1)[0])


class Preprocessor:
    """Decode, augment (``train=True``) or letterbox, and pack one batch of rows.

    Rows are ingested Parquet rows (``image`` bytes, ``boxes``, ``labels``, ``image_id``) or, for
    inference over files, ``path`` + ``image_id`` (the bytes are read here, on the CPU node).
    """

    def __init__(self, input_size: tuple[int, int], max_objects: int, train: bool,
                 augment: str = "centernet", scale_range: tuple[float, float] = (0.6, 1.4),
                 flip_prob: float = 0.5, color_jitter: float = 0.4, seed: int = 0, epoch: int = 0,
                 max_pixels: int | None = 100_000_000, on_problem: Callable[[str, str], None] | None = None) -> None:
        self.input_size = tuple(input_size)
        self.on_problem = on_problem  # also told of every dropped or repaired row, e.g. a shared report
        self.max_objects = max_objects
        self.train = train
        self.seed, self.epoch = seed, epoch
        self.max_pixels = max_pixels
        self.transform = (TrainTransform(input_size, augment, scale_range, flip_prob, color_jitter)
                          if train else ValTransform(input_size))
        self.counts: Counter[str] = Counter()

    def report(self, problem: str, example: str) -> None:
        """Record a dropped or repaired row (and pass it to ``on_problem``)."""
        self.counts[problem] += 1
        log.warning("preprocess: %s: %s", problem, example)
        if self.on_problem is not None:
            self.on_problem(problem, example)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Decode, augment (or letterbox) and pack every row of ``batch`` (see the module docstring)."""
        rows = []
        for i in range(len(batch["image_id"])):
            decoded = self._decode(batch, i)
            if decoded is not None:
                image, boxes, labels, image_id, size = decoded
                rows.append(self._pack_row(self._transform(image, boxes, labels, image_id), image_id, size))
        return self._pack(rows)

    def prepare(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """The part of a training batch that is the same every epoch, which ``data.cache`` keeps in
        Ray's object store: rows decoded, bad ones dropped and reported, and for the ``flip`` and
        ``none`` presets letterboxed (``TrainTransform.prepare``). :meth:`augment` does the rest.

        Columns: image uint8 [B, 3, H_in, W_in] for flip/none, else one [3, h, w] array per row
        (object array: sizes differ); boxes one float32 [N, 4] per row (object array) in that
        image's pixels; labels one int64 [N] per row; image_id [B]; original_size int32 [B, 2];
        region int32 [B, 4] (top, left, crop_h, crop_w; all 0 = not cropped yet).
        """
        if not self.train:
            raise ValueError("prepare/augment split the training transform; validation rows are cached whole")
        prepared, ids, sizes = [], [], []
        for i in range(len(batch["image_id"])):
            decoded = self._decode(batch, i)
            if decoded is not None:
                image, boxes, labels, image_id, size = decoded
                prepared.append(self.transform.prepare(image, boxes, labels))
                ids.append(image_id)
                sizes.append(size)
        images = [p.image.numpy() for p in prepared]
        fixed = self.transform.preset in LETTERBOX_PRESETS
        return {
            "image": np.stack(images) if fixed and images else _objects(images),
            "boxes": _objects([p.boxes.numpy() for p in prepared]),
            "labels": _objects([p.labels.numpy() for p in prepared]),
            "image_id": np.array(ids, dtype=np.int64),
            "original_size": np.array(sizes, dtype=np.int32).reshape(-1, 2),
            "region": np.array([p.region or (0, 0, 0, 0) for p in prepared], dtype=np.int32).reshape(-1, 4),
        }

    def augment(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """The random part on rows from :meth:`prepare`: the same output as calling the
        preprocessor on the rows they came from (same seed and epoch)."""
        rows = []
        for i in range(len(batch["image_id"])):
            region = tuple(int(v) for v in batch["region"][i])
            # copies: the cached rows come zero-copy, read-only, from Ray's object store
            prepared = Prepared(torch.from_numpy(np.array(batch["image"][i])),
                                torch.from_numpy(np.array(batch["boxes"][i], dtype=np.float32)).reshape(-1, 4),
                                torch.from_numpy(np.array(batch["labels"][i], dtype=np.int64)),
                                region if region[2] > 0 else None)
            image_id = int(batch["image_id"][i])
            result = self.transform.finish(prepared, seed=sample_seed(self.seed, self.epoch, image_id))
            rows.append(self._pack_row(result, image_id, tuple(int(v) for v in batch["original_size"][i])))
        return self._pack(rows)

    def _pack(self, rows: list[tuple]) -> dict[str, np.ndarray]:
        out = {name: np.zeros((len(rows), *shape), dtype=dtype)
               for name, (shape, dtype) in packed_columns(self.input_size, self.max_objects).items()}
        for j, (image, boxes, classes, image_id, matrix, size) in enumerate(rows):
            out["image"][j] = image
            out["boxes"][j, : len(boxes)] = boxes
            out["classes"][j, : len(classes)] = classes
            out["num_boxes"][j] = len(boxes)
            out["image_id"][j] = image_id
            out["input_to_original"][j] = matrix
            out["original_size"][j] = size
        return out

    def _decode(self, batch: dict[str, Any], i: int) -> tuple | None:
        """Row ``i``: (uint8 [3, H, W] image, valid boxes [N, 4], labels [N], image_id, (width, height)),
        or None when the row was dropped (and reported)."""
        image_id = int(batch["image_id"][i])
        if "image" in batch:
            data = bytes(batch["image"][i])
        else:  # inference over files: rows carry a path instead of bytes
            try:
                data = storage.read_bytes(str(batch["path"][i]))
            except OSError as exc:
                self.report("missing_images", f"{batch['path'][i]}: {exc}")
                return None
        try:
            image = decode_image(data, self.max_pixels)
        except ImageDecodeError as exc:
            where = batch["path"][i] if "path" in batch else f"image_id={image_id}"
            self.report("unreadable_images", f"{where}: {exc}")
            return None
        boxes = np.array(batch["boxes"][i] if "boxes" in batch else [], dtype=np.float32).reshape(-1, 4)
        labels = np.array(batch["labels"][i] if "labels" in batch else [], dtype=np.int64)
        finite = np.isfinite(boxes).all(1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not finite.all():
            self.report("dropped_invalid_boxes", f"image_id={image_id}: {int((~finite).sum())} box(es)")
            boxes, labels = boxes[finite], labels[finite]
        return image, boxes, labels, image_id, (image.shape[2], image.shape[1])

    def _transform(self, image: Any, boxes: np.ndarray, labels: np.ndarray, image_id: int) -> Preprocessed:
        if self.train:
            return self.transform(image, boxes, labels, seed=sample_seed(self.seed, self.epoch, image_id))
        return self.transform(image, boxes, labels)

    def _pack_row(self, result: Preprocessed, image_id: int, size: tuple[int, int]) -> tuple:
        out_boxes = result.boxes.numpy() / OUTPUT_STRIDE
        classes = result.labels.numpy().astype(np.int32)
        if len(out_boxes) > self.max_objects:
            if self.max_objects:  # 0 = boxes not wanted (inference), nothing worth reporting
                self.report("boxes_beyond_max_objects", f"image_id={image_id}: {len(out_boxes)} > {self.max_objects}")
            out_boxes, classes = out_boxes[: self.max_objects], classes[: self.max_objects]
        return result.image.numpy(), out_boxes, classes, image_id, result.input_to_original.numpy(), size


def packed_columns(input_size: tuple[int, int], max_objects: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """The preprocessed batch's columns: name -> (shape of one row, dtype)."""
    height, width = input_size
    return {
        "image": ((3, height, width), np.uint8),
        "boxes": ((max_objects, 4), np.float32),  # padded; num_boxes of them are objects
        "classes": ((max_objects,), np.int32),
        "num_boxes": ((), np.int32),
        "image_id": ((), np.int64),
        "input_to_original": ((2, 3), np.float32),
        "original_size": ((2,), np.int32),
    }


def packed_row_bytes(input_size: tuple[int, int], max_objects: int) -> int:
    """Bytes of one preprocessed row (see :func:`packed_columns`)."""
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
               for shape, dtype in packed_columns(input_size, max_objects).values())


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array holding ``arrays`` (numpy would stack arrays of one shape into a block)."""
    out = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        out[i] = array
    return out
