import json

import numpy as np
import pytest

from centernet_ray.evaluation import STAT_NAMES, coco_evaluate, coco_from_dict, detections_to_coco


@pytest.fixture
def ground_truth():
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in (1, 2)]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [100, 100, 60, 80], "area": 4800, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 5, "bbox": [5, 120, 120, 70], "area": 8400, "iscrowd": 0},
    ]
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]}


def perfect(gt):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]


def test_perfect_detections_score_ap_one(ground_truth):
    stats = coco_evaluate(coco_from_dict(ground_truth), perfect(ground_truth))
    assert list(stats) == list(STAT_NAMES)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)


def test_empty_detections_score_zero(ground_truth):
    stats = coco_evaluate(coco_from_dict(ground_truth), [])
    assert all(value == 0.0 for value in stats.values())


def test_wrong_class_scores_zero_and_half_found_scores_between(ground_truth):
    wrong = [dict(d, category_id=9 if d["category_id"] == 5 else 5) for d in perfect(ground_truth)]
    assert coco_evaluate(coco_from_dict(ground_truth), wrong)["AP"] == 0.0
    half = coco_evaluate(coco_from_dict(ground_truth), perfect(ground_truth)[:1])
    assert 0.0 < half["AP"] < 1.0


def test_evaluate_reads_a_json_path_and_rejects_unknown_images(ground_truth, tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(ground_truth))
    assert coco_evaluate(str(path), perfect(ground_truth))["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="absent"):
        coco_evaluate(str(path), [dict(perfect(ground_truth)[0], image_id=77)])


def test_detections_to_coco_converts_boxes_and_category_ids():
    boxes = np.array([[[10, 20, 40, 60], [0, 0, 1, 1]]], dtype=np.float32)
    results = detections_to_coco([42], boxes, np.array([[0.8, 0.01]]), np.array([[1, 0]]), [5, 9], score_threshold=0.05)
    assert results == [{"image_id": 42, "category_id": 9, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.8}]
