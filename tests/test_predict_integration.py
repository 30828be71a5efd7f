"""`centernet-ray predict` end to end on a real local Ray."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from centernet_ray.cli import main

pytestmark = pytest.mark.integration


def test_predict_writes_coco_results_and_scores_them(ray_session, shapes_dataset, untrained_checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(shapes_dataset / "images" / "val", images)
    out = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(untrained_checkpoint), "--images", str(images), "--output", str(out),
                 "--annotations", str(shapes_dataset / "annotations" / "instances_val.json"), "--batch-size", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "12 images" in printed and "AP50" in printed
    from pycocotools.coco import COCO

    gt = COCO(str(shapes_dataset / "annotations" / "instances_val.json"))
    detections = json.loads((out / "detections.json").read_text())
    assert detections and gt.loadRes(detections)  # pycocotools accepts them
    assert set(json.loads((out / "metrics.json").read_text())) >= {"AP", "AP50", "ARl"}
    assert (out / "detections.parquet").stat().st_size > 0


def test_predict_rejects_a_bad_override_before_starting_work(untrained_checkpoint, tmp_path, capsys):
    code = main(["predict", "--checkpoint", str(untrained_checkpoint), "--images", str(tmp_path), "--output",
                 str(tmp_path / "out"), "data.preprocess_compute=threads"])
    assert code != 0 and "data.preprocess_compute must be one of" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_predict_accepts_any_pillow_image_and_reports_unreadable_files(ray_session, untrained_checkpoint, tmp_path, capsys):
    images = tmp_path / "mixed"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert("L").save(images / "gray.png")
    Image.fromarray(pixels).convert("RGBA").save(images / "alpha.png")
    Image.fromarray(pixels).convert("P").save(images / "palette.gif")
    Image.fromarray(pixels).save(images / "big.bmp")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    out = tmp_path / "out"
    # the checkpoint's config with an override: the pipeline's task flavour of the preprocessing stage
    assert main(["predict", "--checkpoint", str(untrained_checkpoint), "--images", str(images), "--output", str(out),
                 "data.preprocess_compute=tasks"]) == 0
    printed = capsys.readouterr().out
    assert "4 images" in printed and "unreadable_images': 1" in printed
    ids = json.loads((out / "images.json").read_text())
    assert len(ids) == 5 and {d["image_id"] for d in json.loads((out / "detections.json").read_text())} <= {int(i) for i in ids}
