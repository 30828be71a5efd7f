"""Where a config's data lives: image/annotation locations per split and their ingested Parquet."""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass

from centernet_ray import storage
from centernet_ray.config import ConfigError, DataConfig
from centernet_ray.data.synthetic import default_cache_dir, ensure_shapes_dataset


@dataclass
class SplitSource:
    images: str  # directory or URI of the image files
    annotations: str  # instances json path or URI
    parquet: str  # where the ingested shards go


def uses_synthetic_data(config: DataConfig) -> bool:
    """Whether ``config`` trains on the synthetic shapes: no ``root``, and no split with both its
    images and its annotations given."""
    explicit = ((config.train_images, config.train_annotations), (config.val_images, config.val_annotations))
    return not config.root and not any(all(pair) for pair in explicit)


def split_sources(config: DataConfig) -> dict[str, SplitSource]:
    """``{"train": ..., "val": ...}`` for ``config``; generates the synthetic dataset when it uses
    it (``uses_synthetic_data``)."""
    explicit = {"train": (config.train_images, config.train_annotations), "val": (config.val_images, config.val_annotations)}
    root = config.root
    if uses_synthetic_data(config):
        root = str(ensure_shapes_dataset(config.synthetic_train_images, config.synthetic_val_images,
                                         config.synthetic_image_size))
    sources = {}
    for split, name in (("train", config.train_split), ("val", config.val_split)):
        images, annotations = explicit[split]
        if not (images and annotations):
            if not root:
                raise ConfigError(f"data.{split}_images and data.{split}_annotations must both be set "
                                  "(or data.root to a dataset in the images/{split}, annotations/ layout)")
            images = images or storage.join(root, "images", name)
            annotations = annotations or storage.join(root, "annotations", f"instances_{name}.json")
        if config.parquet_dir or root:
            parquet = storage.join(config.parquet_dir or storage.join(root, "parquet"), split)
        else:
            parquet = cached_parquet(images, annotations)
        sources[split] = SplitSource(images, annotations, parquet)
    return sources


def cached_parquet(images: str, annotations: str) -> str:
    """Where a split given by its own locations (no ``data.root``, no ``data.parquet_dir``) is
    ingested: a folder of the cache named after its annotation file and keyed by both locations.
    One folder for every such dataset would make each ingest replace the other's shards, under a
    run still reading them, and switching back and forth ingest again every time."""
    where = [location if storage.is_uri(location) else os.path.abspath(location) for location in (images, annotations)]
    key = hashlib.sha256("\n".join(where).encode()).hexdigest()[:12]
    name = posixpath.splitext(posixpath.basename(where[1].rstrip("/")))[0] or "annotations"
    return str(default_cache_dir() / "parquet" / f"{name}-{key}")
