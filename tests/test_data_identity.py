"""The dataset a run or a sweep was started on, as a rerun compares it (centernet_ray/data/identity.py)."""

from centernet_ray.config import load_config
from centernet_ray.data.identity import (ANNOTATIONS_SHA256_KEYS, changed_annotations, changed_data_locations,
                                         given_data_locations)


def test_the_dataset_s_locations_are_compared_as_the_command_gave_them():
    """Relative paths as written (normalised), URIs as they are; a location the run's file does not
    hold (written by an older version) is not compared."""
    given = given_data_locations(load_config("demo", ["data.root=./coco/", "data.val_annotations=s3://b/ann/val.json"]))
    assert given == {"data.root": "coco", "data.train_images": "", "data.train_annotations": "", "data.val_images": "",
                     "data.val_annotations": "s3://b/ann/val.json"}
    assert changed_data_locations(given, given_data_locations(load_config("demo", [
        "data.root=coco", "data.val_annotations=s3://b/ann/val.json"]))) == []
    assert changed_data_locations(given, given_data_locations(load_config("demo", [
        "data.root=coco2017", "data.val_annotations=s3://b/ann/val.json"]))) == ["data.root: 'coco' -> 'coco2017'"]
    assert changed_data_locations({"data.root": "coco"}, given_data_locations(load_config("demo", [
        "data.root=coco", "data.val_annotations=s3://b/other.json"]))) == []
    assert given_data_locations(load_config("demo", ["data.root=s3://b/coco/"]))["data.root"] == "s3://b/coco"


def test_annotation_files_are_compared_by_their_sha256_where_the_run_kept_one():
    """A split whose annotation file now has another sha256 is named with both digests' first 12
    characters; one the run kept no sha256 of (the synthetic default, an older run) or that cannot be
    read now (None) is not compared."""
    trained = {"data.root": "coco", ANNOTATIONS_SHA256_KEYS["train"]: "a" * 64, ANNOTATIONS_SHA256_KEYS["val"]: "b" * 64}
    same = {"train": ("/d/train.json", "a" * 64), "val": ("s3://b/val.json", "b" * 64)}
    assert changed_annotations(trained, same) == []
    assert changed_annotations(trained, {**same, "val": ("s3://b/val.json", "c" * 64)}) == [
        "s3://b/val.json: other content (sha256 bbbbbbbbbbbb -> cccccccccccc)"]
    assert changed_annotations(trained, {**same, "train": ("/d/train.json", None)}) == []
    assert changed_annotations({"data.root": "coco"}, {"train": ("/d/train.json", "c" * 64)}) == []
