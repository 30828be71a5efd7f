import io
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from centernet_ray.data.preprocess import Preprocessor, sample_seed
from centernet_ray.data.image_check import check_image
from centernet_ray.ray_data.ingest import ingest_coco
from centernet_ray.targets import render_targets
from centernet_ray.targets import encode_targets


def rows(table):
    data = table.to_pydict()
    return {k: np.array(v, dtype=object) if k in ("image", "boxes", "labels") else np.array(v) for k, v in data.items()}


@pytest.fixture(scope="module")
def val_rows(shapes_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("pq")
    result = ingest_coco(str(shapes_dataset / "images" / "val"),
                         str(shapes_dataset / "annotations" / "instances_val.json"), str(out))
    return rows(pq.read_table(out / result.shards[0]))


def test_batches_have_the_documented_shapes_and_dtypes(val_rows):
    out = Preprocessor((64, 96), max_objects=8, train=True)(val_rows)
    n = len(val_rows["image_id"])
    expected = {"image": ((n, 3, 64, 96), np.uint8), "boxes": ((n, 8, 4), np.float32), "classes": ((n, 8), np.int32),
                "num_boxes": ((n,), np.int32), "image_id": ((n,), np.int64),
                "input_to_original": ((n, 2, 3), np.float32), "original_size": ((n, 2), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == expected


def test_val_boxes_map_back_to_the_annotations(val_rows):
    out = Preprocessor((128, 128), max_objects=8, train=False)(val_rows)
    for j in range(3):
        count = out["num_boxes"][j]
        boxes = out["boxes"][j, :count].reshape(-1, 2) * 4
        matrix = out["input_to_original"][j]
        original = (boxes @ matrix[:, :2].T + matrix[:, 2]).reshape(-1, 4)
        np.testing.assert_allclose(original, np.asarray(val_rows["boxes"][j]).reshape(-1, 4), atol=1e-3)


def test_augmentation_depends_on_seed_epoch_and_image_only(val_rows):
    first = Preprocessor((64, 64), 8, True, seed=1, epoch=0)(val_rows)
    again = Preprocessor((64, 64), 8, True, seed=1, epoch=0)(val_rows)
    next_epoch = Preprocessor((64, 64), 8, True, seed=1, epoch=1)(val_rows)
    assert np.array_equal(first["image"], again["image"]) and np.array_equal(first["boxes"], again["boxes"])
    assert not np.array_equal(first["image"], next_epoch["image"])
    other_seed = Preprocessor((64, 64), 8, True, seed=2, epoch=0)(val_rows)
    assert not np.array_equal(first["image"], other_seed["image"])
    assert sample_seed(1, 0, 5) != sample_seed(1, 0, 6)
    # "image only": an image's augmentation does not depend on its place in the batch
    reversed_rows = {key: value[::-1] for key, value in val_rows.items()}
    backwards = Preprocessor((64, 64), 8, True, seed=1, epoch=0)(reversed_rows)
    by_id = {int(i): image for i, image in zip(backwards["image_id"], backwards["image"])}
    assert all(np.array_equal(by_id[int(i)], image) for i, image in zip(first["image_id"], first["image"]))


def test_corrupt_images_and_broken_boxes_are_dropped_and_reported(val_rows):
    batch = {k: v.copy() for k, v in val_rows.items()}
    batch["image"][0] = b"\xff\xd8 not really a jpeg"
    batch["image"][1] = bytes(batch["image"][1])[:200]  # truncated
    boxes = np.asarray(batch["boxes"][2], dtype=np.float32).copy()
    boxes[:4] = [np.nan, 1, 5, 5]
    batch["boxes"][2] = boxes
    preprocessor = Preprocessor((64, 64), 8, train=False)
    out = preprocessor(batch)
    assert len(out["image_id"]) == len(batch["image_id"]) - 2
    assert preprocessor.counts == {"unreadable_images": 2, "dropped_invalid_boxes": 1}
    assert out["num_boxes"][0] == len(np.asarray(val_rows["boxes"][2])) // 4 - 1


def test_objects_beyond_max_objects_are_cut_and_counted(val_rows):
    preprocessor = Preprocessor((64, 64), max_objects=1, train=False)
    out = preprocessor(val_rows)
    assert out["num_boxes"].max() == 1 and preprocessor.counts["boxes_beyond_max_objects"] > 0


def test_max_objects_zero_drops_boxes_silently_for_inference(val_rows):
    preprocessor = Preprocessor((64, 64), max_objects=0, train=False)
    out = preprocessor(val_rows)
    assert out["boxes"].shape == (len(val_rows["image_id"]), 0, 4) and not preprocessor.counts


@pytest.mark.parametrize("method", ["loop", "vectorised"])  # the CPU's renderer and the accelerators'
def test_render_targets_equals_encode_targets_per_image(val_rows, method):
    out = Preprocessor((64, 64), 8, True)(val_rows)
    targets = render_targets(out["boxes"], out["classes"], out["num_boxes"], 4, (16, 16), 8, 0.5, "exact",
                             method=method)
    for j in range(len(out["image_id"])):
        count = out["num_boxes"][j]
        ref = encode_targets(out["boxes"][j, :count], out["classes"][j, :count], 4, (16, 16), 8, 0.5, "exact")
        for key in ("heatmap", "index", "mask", "size", "offset"):
            np.testing.assert_array_equal(targets[key][j].numpy(), ref[key])


def test_check_image_accepts_images_and_names_the_problem_otherwise():
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="JPEG")
    assert check_image(buffer.getvalue()) is None
    assert check_image(buffer.getvalue()[: len(buffer.getvalue()) // 2]) == "OSError: Truncated File Read"
    assert check_image(b"nope") == "UnidentifiedImageError: 4 bytes in no format Pillow reads"


@pytest.mark.parametrize("preset", ["flip", "none", "centernet", "centernet_official"])
def test_the_cached_part_then_the_random_part_equal_the_whole_preprocessor(val_rows, preset):
    """data.cache runs ``prepare`` once and ``augment`` every epoch: bit for bit what the uncached
    stage gives for the same seed and epoch, for every preset (exact: same operations, same draws)."""
    settings = dict(input_size=(96, 128), max_objects=8, train=True, augment=preset, seed=3)
    for epoch in (0, 1):
        whole = Preprocessor(**settings, epoch=epoch)(val_rows)
        prepared = Preprocessor(**settings, epoch=epoch).prepare(val_rows)
        split = Preprocessor(**settings, epoch=epoch).augment(prepared)
        assert whole.keys() == split.keys()
        for key in whole:
            np.testing.assert_array_equal(whole[key], split[key], err_msg=f"{preset} epoch {epoch}: {key}")
    fixed = preset in ("flip", "none")
    assert prepared["image"].dtype == (np.uint8 if fixed else object)
    assert (prepared["region"][:, 2] > 0).all() == fixed  # the letterbox is done once for flip/none only


@pytest.mark.parametrize("preset", ["flip", "centernet"])
def test_augment_takes_read_only_rows_as_the_object_store_hands_them(val_rows, preset, monkeypatch):
    """The cache's rows reach ``augment`` zero-copy from Ray's object store, read-only: no warning
    (torch warns about every read-only array it is given; it was in every demo log), rows unchanged."""
    settings = dict(input_size=(96, 128), max_objects=8, train=True, augment=preset, seed=3)
    prepared = Preprocessor(**settings).prepare(val_rows)
    arrays = [array for column in prepared.values()
              for array in (column if column.dtype == object else [column])]
    for array in arrays:
        array.flags.writeable = False
    before = [array.copy() for array in arrays]
    from_numpy = torch.from_numpy

    def writable_only(array):  # torch warns once per process only: check every call, not the warning
        assert array.flags.writeable, "a read-only array handed to torch"
        return from_numpy(array)

    monkeypatch.setattr(torch, "from_numpy", writable_only)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Preprocessor(**settings, epoch=1).augment(prepared)
    for array, copy in zip(arrays, before):
        np.testing.assert_array_equal(array, copy)


def test_prepare_drops_and_reports_bad_rows_as_the_whole_preprocessor_does(val_rows):
    batch = {k: v.copy() for k, v in val_rows.items()}
    batch["image"][0] = b"\xff\xd8 not really a jpeg"
    preprocessor = Preprocessor((64, 64), 8, train=True, augment="flip")
    prepared = preprocessor.prepare(batch)
    assert len(prepared["image_id"]) == len(batch["image_id"]) - 1
    assert preprocessor.counts == {"unreadable_images": 1}
    with pytest.raises(ValueError, match="validation rows are cached whole"):
        Preprocessor((64, 64), 8, train=False).prepare(batch)
