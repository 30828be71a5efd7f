"""Which dataset a training run or a sweep was started on, as a rerun under its name compares it:
the dataset's locations as the command gave them, and the sha256 of each split's annotation file.

A rerun on another dataset would otherwise resume (or, finished, report) the run trained on the
first. Locations are compared as written, not as absolute paths: a relative path names the same
files from another folder or another session of a Ray job. The same locations may hold other files
by the time of a rerun (annotations fixed or regenerated in place), hence the annotation files'
sha256 (not kept for the synthetic default, whose files follow from its settings). Images changed in
place do not refuse a rerun (hashing every image would be an ingest): the ingest finds them by its
listing of the image files and ingests them again, and a resumed run trains on them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from centernet_ray import storage
from centernet_ray.config import Config, DataConfig
from centernet_ray.data.sources import split_sources, uses_synthetic_data
from centernet_ray.errors import UserInputError

log = logging.getLogger(__name__)

DATA_LOCATION_KEYS = ("data.root", "data.train_images", "data.train_annotations", "data.val_images",
                      "data.val_annotations")
ANNOTATIONS_SHA256_KEYS = {"train": "data.train_annotations.sha256", "val": "data.val_annotations.sha256"}


def given_data_locations(config: Config) -> dict[str, str]:
    """``DATA_LOCATION_KEYS`` of ``config`` as the command gave them (call it before
    ``storage.with_absolute_paths``): local paths normalised (``./data/`` is ``data``), URIs as they
    are, unset ones empty."""
    flat = config.flatten()
    return {key: _normalised_location(flat[key]) for key in DATA_LOCATION_KEYS}


def _normalised_location(value: Any) -> str:
    if not value:
        return ""
    if storage.is_uri(value):  # s3://b/coco/ is s3://b/coco
        return str(value).rstrip("/") if not str(value).endswith("://") else str(value)
    return os.path.normpath(str(value))


def annotations_sha256(location: str) -> str:
    """The sha256 of the annotation file at ``location`` (a path or URI), as the ingest records it."""
    return hashlib.sha256(storage.read_bytes(location)).hexdigest()


def dataset_record(data: DataConfig, data_locations: dict[str, str],
                   annotations_sha256_by_split: dict[str, str]) -> dict[str, str]:
    """What a run (beside each checkpoint) or a sweep (in its state) keeps of its dataset: its
    locations as given (``given_data_locations``) and, unless ``data`` trains on the synthetic
    shapes (``sources.uses_synthetic_data``), each split's annotation sha256 (split -> hex digest,
    from the ingest)."""
    if uses_synthetic_data(data):
        return dict(data_locations)
    return {**data_locations, **{key: annotations_sha256_by_split[split] for split, key in ANNOTATIONS_SHA256_KEYS.items()}}


def changed_dataset(recorded: dict[str, str], given: dict[str, str], data: DataConfig) -> list[str]:
    """How the dataset a rerun gives differs from ``recorded`` (a ``dataset_record``): its locations
    (``given``: ``given_data_locations`` of the rerun's config), else the content of its annotation
    files (``data``: the rerun's data settings with absolute paths; each file is read once more).
    Empty when it is the same dataset, or when nothing was recorded to compare (a record from an
    older version, a file that cannot be read now: a warning says so)."""
    return changed_data_locations(recorded, given) or changed_annotations(recorded, _current_annotations(data, recorded))


def changed_data_locations(recorded: dict[str, str], given: dict[str, str]) -> list[str]:
    """The dataset locations (``key: old -> new``) a rerun gives differently from ``recorded``."""
    return [f"{key}: {recorded[key]!r} -> {given.get(key, '')!r}" for key in DATA_LOCATION_KEYS
            if key in recorded and recorded[key] != given.get(key, "")]


def changed_annotations(recorded: dict[str, str], current: dict[str, tuple[str, str | None]]) -> list[str]:
    """The annotation files whose content differs from ``recorded``'s (``current``: split -> (the
    file's location, its sha256 now, None when it cannot be read), for the splits with a sha256
    in ``recorded``)."""
    changed = []
    for split, key in ANNOTATIONS_SHA256_KEYS.items():
        if key in recorded and split in current and current[split][1] not in (None, recorded[key]):
            location, digest = current[split]
            changed.append(f"{location}: other content (sha256 {recorded[key][:12]} -> {digest[:12]})")
    return changed


def _current_annotations(data: DataConfig, recorded: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    """split -> (its annotation file's location, its sha256 now or None when it cannot be read), for
    the splits with a sha256 in ``recorded``."""
    splits = [split for split, key in ANNOTATIONS_SHA256_KEYS.items() if key in recorded]
    sources = split_sources(data) if splits else {}
    current = {}
    for split in splits:
        location = sources[split].annotations
        try:
            current[split] = (location, annotations_sha256(location))
        except (OSError, UserInputError) as exc:  # gone, unreadable or its bucket unknown here: the ingest says so if it needs it
            log.warning("not comparing %s with the annotations recorded for this name: %s", location, exc)
            current[split] = (location, None)
    return current
