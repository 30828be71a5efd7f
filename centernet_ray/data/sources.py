"""Where a config's data lives: image/annotation locations per split and their ingested Parquet."""

from __future__ import annotations

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
        parquet_root = config.parquet_dir or (storage.join(root, "parquet") if root else
                                              str(default_cache_dir() / "parquet"))
        sources[split] = SplitSource(images, annotations, storage.join(parquet_root, split))
    return sources
