"""`centernet-ray predict` end to end on a real local Ray."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from centernet_ray.cli import main

pytestmark = pytest.mark.integration


def test_predict_writes_coco_results_and_scores_the_images_it_read(ray_session, trained_checkpoint, tmp_path, capsys):
    """The overfitted checkpoint on the images it learned, one of them missing from the folder: the
    COCO results score well, and metrics.json is COCOeval of detections.json over the images read
    (the missing one counted, as training's evaluation leaves out what ingest dropped). A second run
    into the folder without annotations leaves no metrics.json of the first behind."""
    from centernet_ray.evaluation import coco_evaluate

    checkpoint, dataset = trained_checkpoint
    images, annotations = tmp_path / "images", dataset / "annotations" / "instances_train.json"
    shutil.copytree(dataset / "images" / "train", images)
    gone = sorted(images.iterdir())[0]
    gone.unlink()
    out = tmp_path / "out"
    out.mkdir()
    (out / "images.json").write_text("{}")  # an earlier run's, without annotations
    assert main(["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--output", str(out),
                 "--annotations", str(annotations), "--batch-size", "4"]) == 0
    assert "7 images" in capsys.readouterr().out
    detections = json.loads((out / "detections.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    read = sorted({d["image_id"] for d in detections})
    gt = json.loads(annotations.read_text())
    assert len(read) == 7 and next(i["id"] for i in gt["images"] if i["file_name"] == gone.name) not in read
    assert metrics["AP"] > 0.5 and metrics["AP"] == pytest.approx(coco_evaluate(str(annotations), detections, read)["AP"])
    assert (metrics["eval_images"], metrics["missing_images"], metrics["unreadable_images"]) == (7, 1, 0)
    assert not (out / "images.json").exists() and (out / "detections.parquet").stat().st_size > 0

    assert main(["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--output", str(out)]) == 0
    assert not (out / "metrics.json").exists() and len(json.loads((out / "images.json").read_text())) == 7


def test_predict_rejects_a_bad_override_before_starting_work(untrained_checkpoint, tmp_path, capsys):
    code = main(["predict", "--checkpoint", str(untrained_checkpoint), "--images", str(tmp_path), "--output",
                 str(tmp_path / "out"), "data.preprocess_compute=threads"])
    assert code == 2 and "data.preprocess_compute must be one of" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(300)  # actors that starve the preprocessing, if not refused, wait for ever: fail, not hang
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
    # model actors that, beside the preprocessing, want more CPUs than this Ray has would hold every CPU
    # while the preprocessing waited for one, for ever: refused before the work, saying how many fit
    cpus = int(ray_session.cluster_resources()["CPU"])
    assert main(["predict", "--checkpoint", str(untrained_checkpoint), "--images", str(images), "--output",
                 str(tmp_path / "refused"), "--actors", str(cpus), "data.preprocess_compute=tasks"]) == 2
    assert ray_session.cluster_resources().get("GPU") or capsys.readouterr().err == (  # with GPUs, those are short too
        f"error: {cpus} model actors (--actors {cpus}) and the preprocessing need {cpus + 1} CPUs, but the Ray this "
        f"command started has {cpus} CPUs: lower --actors (at most {cpus - 1} fit); or run on a cluster that has them "
        "(RAY_ADDRESS, or `ray job submit`)\n")
    assert not (tmp_path / "refused").exists()
