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


def test_empty_detections_score_as_coco_eval_scores_a_detection_that_finds_nothing(ground_truth):
    """0 where there are objects; COCOeval's -1 for an area range without any, NaN per class (the
    per-class AP metrics and figure leave such classes out)."""
    from centernet_ray.evaluation import coco_evaluation

    empty = coco_evaluation(coco_from_dict(ground_truth), [])
    useless = coco_evaluation(coco_from_dict(ground_truth), [dict(perfect(ground_truth)[0], bbox=[0, 0, 0.5, 0.5])])
    assert empty.stats == useless.stats and empty.stats["AP"] == 0.0 and empty.stats["AR100"] == 0.0
    assert -1.0 in empty.stats.values()  # an area range this ground truth has no object in
    extra = {**ground_truth, "categories": [*ground_truth["categories"], {"id": 77, "name": "never"}]}
    per_class = coco_evaluation(coco_from_dict(extra), []).class_ap()
    assert np.isnan(per_class[-1]) and np.all(per_class[:-1] == 0.0)  # was 0 for the class without objects


def test_wrong_class_scores_zero_and_half_found_scores_the_hand_value(ground_truth):
    """Half found: one of class 5's two objects, exactly, and none of class 9's. Class 5's precision is
    1 up to recall 0.5: 51 of COCOeval's 101 recall points (0, 0.01, ..., 0.5), so its AP is 51/101
    at every IoU threshold; class 9's is 0; the AP stat is their mean, 51/202."""
    wrong = [dict(d, category_id=9 if d["category_id"] == 5 else 5) for d in perfect(ground_truth)]
    assert coco_evaluate(coco_from_dict(ground_truth), wrong)["AP"] == 0.0
    half = coco_evaluate(coco_from_dict(ground_truth), perfect(ground_truth)[:1])
    assert half["AP"] == pytest.approx(51 / 202, abs=1e-9) and half["AP50"] == pytest.approx(51 / 202, abs=1e-9)
    assert half["AR100"] == pytest.approx(0.25, abs=1e-9)  # recall 1/2 and 0 per class


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


@pytest.mark.parametrize("mend", ["no area", "no iscrowd", "no id", "ids from 1 per image", "one id for all",
                                  "ids from 0"])
def test_ground_truth_that_training_reads_is_scored_as_the_complete_file(ground_truth, mend):
    """Converters leave out ``area``, ``iscrowd`` or ``id``, or number the annotations per image:
    pycocotools failed with KeyError on the first three (in `eval`, and in training's first
    evaluation) and scored repeated ids as one object (AP 0.31 for perfect detections)."""
    changed = json.loads(json.dumps(ground_truth))
    for i, annotation in enumerate(changed["annotations"]):
        {"no area": lambda: annotation.pop("area"), "no iscrowd": lambda: annotation.pop("iscrowd"),
         "no id": lambda: annotation.pop("id"), "ids from 1 per image": lambda: annotation.update(id=1 + i % 2),
         "one id for all": lambda: annotation.update(id=1),
         "ids from 0": lambda: annotation.update(id=i)}[mend]()  # pycocotools' matching takes 0 for "unmatched"
    stats = coco_evaluate(coco_from_dict(changed), perfect(ground_truth))
    assert stats == coco_evaluate(coco_from_dict(ground_truth), perfect(ground_truth)) and stats["AP"] == 1.0
    assert "area" not in changed["annotations"][0] or mend != "no area"  # the caller's dict is left as it was


def test_an_annotation_without_a_usable_box_is_left_out_of_the_score(ground_truth):
    broken = {**ground_truth, "annotations": [*ground_truth["annotations"], {"id": 4, "image_id": 2, "category_id": 9,
                                                                           "bbox": [], "iscrowd": 0, "area": 0}]}
    assert coco_evaluate(coco_from_dict(broken), perfect(ground_truth))["AP"] == 1.0  # was pycocotools' Exception


def test_boxes_that_are_not_finite_are_not_detections():
    """A diverging model's NaN sizes: COCOeval matched NaN boxes to objects (AP 1.0 for all-NaN)."""
    boxes = np.array([[[10, 10, 60, 50], [np.nan, 1, 2, 3], [1, 1, np.inf, 9]]], dtype=np.float32)
    results = detections_to_coco([1], boxes, np.array([[0.9, 0.8, 0.7]]), np.array([[0, 0, 0]]), [5])
    assert [r["bbox"] for r in results] == [[10.0, 10.0, 50.0, 40.0]]


@pytest.mark.parametrize("detection, message", [
    ({"bbox": [float("nan")] * 4}, r"bbox must be \[x, y, width, height\] of finite numbers; got \[nan"),
    ({"score": "0.9"}, "score must be a finite number; got '0.9'"),
    ({"score": None}, "score must be a finite number; got None"),
    ({"image_id": [1]}, r"image_id and category_id must be integers; got \[1\] and 5"),
    ({"category_id": {"id": 5}}, "image_id and category_id must be integers"),
])
def test_detections_coco_eval_would_choke_on_or_be_fooled_by_are_refused(ground_truth, detection, message):
    from centernet_ray.errors import UserInputError
    from centernet_ray.evaluation import check_detections

    detections = [dict(perfect(ground_truth)[0], **detection)]
    with pytest.raises(UserInputError, match=f"dets.json: detection 0: {message}"):
        check_detections(detections, {1, 2}, {5, 9}, "dets.json")
    check_detections(perfect(ground_truth), {1, 2}, {5, 9}, "dets.json")


def test_per_class_ap_averages_to_the_ap_stat_and_pr_curves_come_from_cocoeval(ground_truth):
    """Class 5 found perfectly, class 9 missed: AP per class (1, 0), their mean is the AP stat; the
    IoU-0.5 curve of class 5 is precision 1 at every recall point (COCOeval's 101)."""
    from centernet_ray.evaluation import coco_evaluation

    found = [d for d in perfect(ground_truth) if d["category_id"] == 5]
    result = coco_evaluation(coco_from_dict(ground_truth), found)
    assert result.category_ids == [5, 9] and result.precision.shape == (10, 101, 2)
    np.testing.assert_allclose(result.class_ap(), [1.0, 0.0])
    assert np.nanmean(result.class_ap()) == pytest.approx(result.stats["AP"], abs=1e-12)
    curves = result.pr_curves(0.5)
    assert curves.shape == (101, 2) and np.all(curves[:, 0] == 1.0) and np.all(curves[:, 1] == 0.0)
    with pytest.raises(ValueError, match="thresholds"):
        result.pr_curves(0.52)


def test_a_class_without_ground_truth_has_no_ap(ground_truth):
    from centernet_ray.evaluation import coco_evaluation

    ground_truth["categories"].append({"id": 11, "name": "never"})
    result = coco_evaluation(coco_from_dict(ground_truth), perfect(ground_truth))
    ap = result.class_ap()
    np.testing.assert_allclose(ap[:2], [1.0, 1.0], rtol=1e-12)  # the mean of 1010 ones: sums to 1 - 1e-16
    assert np.isnan(ap[2]) and np.all(np.isnan(result.pr_curves()[:, 2]))


def test_confusion_matrix_counts_matches_confusions_background_and_misses(ground_truth):
    """Hand-counted: image 1: object a found as a (diagonal), object b found with class a (b -> a);
    a duplicate of the first box (already matched: background), a low-score box (ignored) and a box
    in empty space (background). Image 2: nothing found (a missed)."""
    from centernet_ray.evaluation import confusion_matrix

    detections = [
        {"image_id": 1, "category_id": 5, "bbox": [10, 10, 50, 40], "score": 0.9},
        {"image_id": 1, "category_id": 5, "bbox": [102, 100, 60, 80], "score": 0.8},
        {"image_id": 1, "category_id": 9, "bbox": [11, 10, 50, 40], "score": 0.7},
        {"image_id": 1, "category_id": 9, "bbox": [0, 150, 20, 20], "score": 0.6},
        {"image_id": 1, "category_id": 9, "bbox": [100, 100, 60, 80], "score": 0.1},
    ]
    matrix = confusion_matrix(coco_from_dict(ground_truth), detections, [5, 9], score_threshold=0.3)
    #                       pred a  pred b  missed
    expected = np.array([[1, 0, 1],    # true a: one found, one missed (image 2)
                         [1, 0, 0],    # true b: found as a
                         [0, 2, 0]])   # background: the duplicate and the empty-space box
    np.testing.assert_array_equal(matrix, expected)


def test_a_detection_on_a_crowd_region_is_not_counted_as_background(ground_truth):
    from centernet_ray.evaluation import confusion_matrix

    ground_truth["annotations"].append({"id": 4, "image_id": 2, "category_id": 9, "bbox": [150, 10, 40, 40],
                                        "area": 1600, "iscrowd": 1})
    detections = [{"image_id": 2, "category_id": 9, "bbox": [155, 15, 20, 20], "score": 0.9}]
    matrix = confusion_matrix(coco_from_dict(ground_truth), detections, [5, 9], image_ids=[2])
    np.testing.assert_array_equal(matrix, [[0, 0, 1], [0, 0, 0], [0, 0, 0]])


def test_evaluation_figures_draw_every_class(ground_truth):
    import torch

    from centernet_ray.evaluation import coco_evaluation, confusion_matrix
    from centernet_ray.evaluation.figures import (class_ap_figure, confusion_matrix_figure, heatmap_figure,
                                                  pr_curves_figure)

    coco = coco_from_dict(ground_truth)
    result = coco_evaluation(coco, perfect(ground_truth)[:2])
    names = ["a", "b"]
    bars = class_ap_figure(result, names)
    assert [t.get_text() for t in bars.axes[0].get_yticklabels()] == ["a", "b"]  # ascending: the best on top
    curves = pr_curves_figure(result, names)
    assert len(curves.axes[1].get_lines()) == 2 and len(curves.axes[0].get_lines()) == 3
    matrix = confusion_matrix_figure(confusion_matrix(coco, perfect(ground_truth), [5, 9]), names)
    assert [t.get_text() for t in matrix.axes[0].get_xticklabels()] == ["a", "b", "missed"]
    images = [torch.zeros(3, 64, 64, dtype=torch.uint8)] * 3
    heat = [torch.rand(2, 16, 16)] * 3
    figure = heatmap_figure(images, heat, heat)
    titles = [a.get_title() for a in figure.axes if a.get_title()]
    assert titles == [f"image {i}: {kind}" for i in (1, 2, 3) for kind in ("target", "predicted")]


def test_pycocotools_prints_nothing_even_where_print_is_replaced(monkeypatch, capsys):
    """Ray Train workers replace builtins.print with a logger; pycocotools' progress must still stay out."""
    import builtins

    from centernet_ray.evaluation import coco_evaluate, coco_from_dict

    seen = []
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: seen.append(args))
    instances = {"images": [{"id": 1, "width": 10, "height": 10}], "categories": [{"id": 1, "name": "a"}],
                 "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}]}
    stats = coco_evaluate(coco_from_dict(instances), [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9}])
    assert stats["AP50"] == pytest.approx(1.0)
    assert seen == [] and capsys.readouterr().out == ""
