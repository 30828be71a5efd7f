import json

import numpy as np
import pytest

from centernet_ray.data.coco import CocoFormatError, load_coco, parse_coco


def instances(annotations, images=None, categories=None):
    return {
        "images": images if images is not None else [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
    }


def ann(bbox, category_id=7, image_id=1, **extra):
    return {"id": len(str(bbox)), "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def test_category_ids_map_to_contiguous_indices_in_id_order():
    data = parse_coco(instances([ann([10, 10, 20, 30], 7), ann([0, 0, 5, 5], 3)]))
    assert data.category_ids == [3, 7] and data.class_names == ["dog", "cat"]
    record = data.images[0]
    np.testing.assert_allclose(record.boxes, [[10, 10, 30, 40], [0, 0, 5, 5]])
    assert record.labels.tolist() == [1, 0]


def test_crowd_boxes_are_excluded_and_counted():
    data = parse_coco(instances([ann([10, 10, 20, 30], iscrowd=1), ann([1, 1, 5, 5])]))
    assert data.report.crowd_skipped == 1 and data.report.annotations == 1


def test_invalid_boxes_are_dropped_and_partial_ones_clipped():
    data = parse_coco(instances([
        ann([10, 10, -5, 30]), ann([10, 10, 0, 3]), ann([float("nan"), 1, 2, 2]), ann([200, 10, 5, 5]),
        ann("not a box"), ann([10 ** 400, 1, 2, 2]), ann([90, 70, 20, 20]),  # an int too large for a float
    ]))
    assert data.report.dropped_invalid == 6 and data.report.clipped == 1
    np.testing.assert_allclose(data.images[0].boxes, [[90, 70, 100, 80]])
    assert len(data.report.examples["dropped_invalid"]) == 5


def test_unknown_category_and_unknown_image_are_dropped_and_counted():
    data = parse_coco(instances([ann([1, 1, 5, 5], category_id=99), ann([1, 1, 5, 5], image_id=42),
                                 ann([1, 1, 5, 5], image_id="1"), ann([2, 2, 5, 5])]))
    assert data.report.unknown_category == 1 and data.report.unknown_image == 2 and data.report.annotations == 1
    assert "category_id=99" in data.report.summary() and "image_id='1'" in data.report.summary()


@pytest.mark.parametrize("annotations, counted", [
    ([ann([1, 1, 5, 5], category_id=99), ann([1, 1, 5, 5], category_id=98)], "unknown_category=2"),
    ([ann([1, 1, 5], category_id=7), ann([1, 1, 5, 5], image_id="1")],
     r"dropped_invalid=1, e.g. 9 \(bbox=\[1, 1, 5\]\); unknown_image=1, e.g. 12 \(image_id='1'\)"),
])
def test_annotations_none_of_which_is_usable_are_an_error_not_a_dataset_without_objects(annotations, counted):
    """Categories of another file, boxes in another format, ids as strings: the run trained on no object."""
    with pytest.raises(CocoFormatError, match=rf"x.json: none of its 2 annotations is usable \({counted}.*\): "
                                              "nothing to train on"):
        parse_coco(instances(annotations), "x.json")
    assert parse_coco(instances([])).report.annotations == 0  # images without any: predict's input, say
    assert parse_coco(instances([ann([1, 1, 5, 5], iscrowd=1)])).report.crowd_skipped == 1


@pytest.mark.parametrize("broken, message", [
    ({"images": [], "annotations": []}, "categories"),
    (instances([{"image_id": 1, "category_id": 7}]), r"annotations\[0\].*bbox"),
    (instances([], images=[{"id": 1}]), r"images\[0\].*file_name"),
    (instances([], categories=[]), "non-empty"),
    (instances([], categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]), "duplicate"),
    ([1, 2], "JSON object"),
    (instances([], images=[{"id": "img1", "file_name": "a.jpg", "width": 10, "height": 10}]),
     r"images\[0\] \(a.jpg\) has the id 'img1': COCO ids are JSON integers"),
    (instances([], images=[{"id": 1, "file_name": "a.jpg", "width": None, "height": 10}]),
     r"images\[0\] \(a.jpg\) has the width None: it must be the image's width in pixels"),
    (instances([], images=[{"id": 1, "file_name": "a.jpg", "width": 10, "height": "80"}]), "has the height '80'"),
    (instances([], images=[{"id": 1, "file_name": ["a.jpg"], "width": 10, "height": 10}]),
     r"images\[0\] has the file_name \['a.jpg'\]: it must be the image's path"),
    (instances([], categories=[{"id": "c1", "name": "cat"}]), r"categories\[0\] \('cat'\) has the id 'c1'"),
    (instances([ann([1, 1, 5, 5], iscrowd="0")]), r"annotations\[0\] \(id 12\) has iscrowd '0': it must be 0 or 1"),
    (instances([ann([1, 1, 5, 5], iscrowd=None)]), "has iscrowd None"),
    (instances([], images=[{"id": 1, "file_name": "a.jpg", "width": 10 ** 400, "height": 10}]),
     r"has the width 10{39}: it must be"),  # was an OverflowError
    (instances([], images=[{"id": 2 ** 63, "file_name": "a.jpg", "width": 10, "height": 10}]),
     r"has the id 9223372036854775808: COCO ids are JSON integers \(within 64 bits\)"),  # the shards' int64
    (instances([], images=[{"id": 10 ** 400, "file_name": "a.jpg", "width": 10, "height": 10}]), "has the id 10{39}:"),
])
def test_broken_json_structure_raises_a_clear_error(broken, message):
    with pytest.raises(CocoFormatError, match=message):
        parse_coco(broken)


def test_load_coco_reports_missing_image_files(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    data = instances([ann([1, 1, 5, 5]), ann([2, 2, 5, 5], image_id=2)],
                     images=[{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10},
                             {"id": 2, "file_name": "gone.jpg", "width": 10, "height": 10}])
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    dataset = load_coco(path, tmp_path)
    assert [r.file_name for r in dataset.images] == ["a.jpg"]
    assert dataset.report.missing_images == 1 and dataset.report.annotations == 1


def test_load_coco_reads_uris_and_finds_images_in_subfolders(tmp_path):
    (tmp_path / "train2017").mkdir()
    (tmp_path / "train2017" / "a.jpg").write_bytes(b"x")
    data = instances([ann([1, 1, 5, 5]), ann([2, 2, 5, 5], image_id=2)],
                     images=[{"id": 1, "file_name": "train2017/a.jpg", "width": 10, "height": 10},
                             {"id": 2, "file_name": "train2017/gone.jpg", "width": 10, "height": 10}])
    (tmp_path / "instances.json").write_text(json.dumps(data))
    dataset = load_coco(f"file://{tmp_path}/instances.json", f"file://{tmp_path}")
    assert [r.file_name for r in dataset.images] == ["train2017/a.jpg"] and dataset.report.missing_images == 1
    # names that leave the images folder (some exporters write ../) are found, from a path or a URI
    (tmp_path / "other.jpg").write_bytes(b"x")
    outside = instances([ann([1, 1, 5, 5])], images=[{"id": 1, "file_name": "../other.jpg", "width": 10, "height": 10}])
    (tmp_path / "outside.json").write_text(json.dumps(outside))
    for images in (tmp_path / "train2017", f"file://{tmp_path}/train2017"):
        assert load_coco(tmp_path / "outside.json", images).report.missing_images == 0, images
    with pytest.raises(CocoFormatError, match="annotation file not found: file://"):
        load_coco(f"file://{tmp_path}/absent.json")


def test_load_coco_rejects_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CocoFormatError, match="not valid JSON"):
        load_coco(bad)
    bad.write_text('{"images": [], "n": ' + "7" * 5000 + "}")  # beyond Python's 4300-digit limit: a ValueError
    with pytest.raises(CocoFormatError, match="not valid JSON: Exceeds the limit"):
        load_coco(bad)
    with pytest.raises(CocoFormatError, match="not found"):
        load_coco(tmp_path / "absent.json")
