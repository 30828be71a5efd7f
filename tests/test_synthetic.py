import json

import numpy as np
from PIL import Image

from centernet_ray.data.coco import load_coco
from centernet_ray.data.synthetic import SHAPE_CLASSES, ensure_shapes_dataset, render_image, write_shapes_dataset


def test_layout_is_standard_coco(shapes_dataset):
    for split, count in (("train", 24), ("val", 12)):
        dataset = load_coco(shapes_dataset / "annotations" / f"instances_{split}.json", shapes_dataset / "images" / split)
        assert len(dataset.images) == count and dataset.report.missing_images == 0
        assert dataset.class_names == list(SHAPE_CLASSES)
        with Image.open(shapes_dataset / "images" / split / dataset.images[0].file_name) as image:
            assert image.format == "JPEG" and image.size == (96, 96)


def test_images_hold_one_to_six_objects_of_varied_size():
    sides, counts, labels = [], [], set()
    for index in range(200):
        _, boxes, classes = render_image(0, "train", index, 128)
        counts.append(len(boxes))
        labels.update(classes)
        sides += [max(b[2] - b[0], b[3] - b[1]) for b in boxes]
    assert min(counts) >= 1 and max(counts) == 6
    assert min(sides) <= 10 and max(sides) >= 56 and max(sides) <= 64
    assert labels == set(range(len(SHAPE_CLASSES)))


def test_generation_is_deterministic():
    first, boxes1, labels1 = render_image(3, "val", 5, 64)
    second, boxes2, labels2 = render_image(3, "val", 5, 64)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert labels1 == labels2 and all(np.array_equal(a, b) for a, b in zip(boxes1, boxes2))


def test_the_files_are_the_same_however_many_threads_draw_them(tmp_path):
    """Each image has its own seed: drawn by 3 threads, the dataset is byte for byte the one drawn
    by 1 (annotation ids in image order included)."""
    def contents(folder):
        return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}
    one = write_shapes_dataset(tmp_path / "one", 40, 8, 64, seed=2, threads=1)
    three = write_shapes_dataset(tmp_path / "three", 40, 8, 64, seed=2, threads=3)
    assert contents(one) == contents(three) and len(contents(one)) == 40 + 8 + 2


def test_cached_dataset_is_generated_once(tmp_path):
    path = ensure_shapes_dataset(8, 4, 64, seed=1, cache_dir=tmp_path)
    stamp = (path / "annotations" / "instances_train.json").stat().st_mtime_ns
    assert ensure_shapes_dataset(8, 4, 64, seed=1, cache_dir=tmp_path) == path
    assert (path / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp
    assert len(json.loads((path / "annotations" / "instances_val.json").read_text())["images"]) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left behind
