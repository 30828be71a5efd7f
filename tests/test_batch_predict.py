"""Which images ``centernet-ray predict --images DIR --annotations JSON`` predicts and scores, and what it
holds while it runs: its output folder and the ingest it reads (no Ray)."""

import logging

import pytest

from centernet_ray.errors import UserInputError
from centernet_ray.ray_data.batch_predict import _image_rows


def annotations_of(*names):
    return {"images": [{"id": i + 1, "file_name": name, "width": 8, "height": 8} for i, name in enumerate(names)]}


def test_images_none_of_which_are_annotated_are_refused(tmp_path):
    """Before: a warning per image (thousands of lines for a folder), then a COCOeval of nothing."""
    for name in ("x.jpg", "y.png"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserInputError, match=r"none of the 2 images under .* \(e.g. x.jpg\) is in --annotations, whose "
                                             r"2 file names are others \(e.g. a.jpg\)"):
        _image_rows(str(tmp_path), annotations_of("a.jpg", "b.jpg"))


def test_unannotated_and_missing_images_are_said_once_each(tmp_path, caplog):
    for name in ("a.jpg", "extra1.jpg", "extra2.jpg"):
        (tmp_path / name).write_bytes(b"")
    caplog.set_level(logging.WARNING)
    rows, paths, missing = _image_rows(str(tmp_path), annotations_of("./a.jpg", "b.jpg"))
    assert rows == [{"path": str(tmp_path / "a.jpg"), "image_id": 1}] and missing == 1
    assert [r.getMessage().split(" under ")[0] for r in caplog.records] == [
        "predict: 2 image(s)", "predict: 1 annotated image(s) have no file"]


def test_a_missing_image_folder_is_named(tmp_path):
    """Before: pyarrow's "[Errno 2] Cannot list directory ... Detail: [errno 2] ..."."""
    with pytest.raises(UserInputError, match=r"^no image folder at .*pictures$"):
        _image_rows(str(tmp_path / "pictures"), None)


def test_a_folder_another_predict_writes_is_refused_before_ray_starts(untrained_checkpoint, shapes_dataset,
                                                                      tmp_path, monkeypatch):
    """Two commands writing one --output would leave detections.json of one and metrics.json of the other."""
    from centernet_ray import lease, ray_runtime
    from centernet_ray.ray_data.batch_predict import run_predict

    monkeypatch.setattr(ray_runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    with lease.held(str(tmp_path / "out"), what="-", instead="-"):
        with pytest.raises(UserInputError, match=r"the predictions in .*out is in use by another command: `.*` "
                                                 r"\(pid \d+ .*give this command its own --output"):
            run_predict(str(untrained_checkpoint), str(tmp_path / "out"), images=str(shapes_dataset / "images" / "val"))


def test_predict_marks_the_ingest_it_reads_and_is_refused_while_one_writes_it(untrained_checkpoint, shapes_dataset,
                                                                               tmp_path, monkeypatch):
    """An ingest that replaced the shards under ``predict --parquet`` used to fail it midway (or
    mix two datasets): the mark makes the ingest refuse; an ingest under way refuses predict."""
    from centernet_ray import lease, ray_runtime
    from centernet_ray.ray_data.batch_predict import run_predict
    from centernet_ray.ray_data.ingest import ingest_coco

    parquet = str(tmp_path / "pq")
    args = (str(shapes_dataset / "images" / "val"), str(shapes_dataset / "annotations" / "instances_val.json"), parquet)
    ingest_coco(*args, use_ray=False)

    class RayStarted(Exception):
        pass

    def while_predicting(*a, **k):
        with pytest.raises(UserInputError, match=r"would replace the shards in .*pq, but another command reads"):
            ingest_coco(*args, use_ray=False, force=True)
        raise RayStarted

    monkeypatch.setattr(ray_runtime, "init_ray", while_predicting)
    with pytest.raises(RayStarted):
        run_predict(str(untrained_checkpoint), str(tmp_path / "out"), parquet=parquet)
    assert not [p for p in (tmp_path / "pq").iterdir() if p.name.startswith(lease.READER_MARK)]  # removed at the end

    with lease.held(parquet, what="the ingest into pq", instead="-"):  # an ingest at work
        with pytest.raises(UserInputError, match=r".*pq is being ingested now by `.*` \(pid \d+ .*run this once it "
                                                 r"ends"):
            run_predict(str(untrained_checkpoint), str(tmp_path / "out"), parquet=parquet)
    assert not [p for p in (tmp_path / "pq").iterdir() if p.name.startswith(lease.READER_MARK)]


def test_predict_reads_a_dataset_it_may_not_mark_and_refuses_one_that_is_not_there(untrained_checkpoint,
                                                                                  shapes_dataset, tmp_path,
                                                                                  monkeypatch, caplog):
    """Read-only credentials on the dataset's bucket used to be enough for `predict --parquet`; a
    mistyped --parquet was found after Ray's start (and its mark created the folder)."""
    from centernet_ray import lease, ray_runtime
    from centernet_ray.ray_data.batch_predict import run_predict
    from centernet_ray.ray_data.ingest import ingest_coco

    monkeypatch.setattr(ray_runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(UserInputError, match=r"^no ingested dataset at .*nosuch \(no _manifest.json: `centernet-ray "
                                             r"data ingest` writes one\)$"):
        run_predict(str(untrained_checkpoint), str(tmp_path / "out"), parquet=str(tmp_path / "nosuch"))
    assert not (tmp_path / "nosuch").exists()

    parquet = str(tmp_path / "pq")
    ingest_coco(str(shapes_dataset / "images" / "val"), str(shapes_dataset / "annotations" / "instances_val.json"),
                parquet, use_ray=False)

    class RayStarted(Exception):
        pass

    def read_only(self, folder):
        raise PermissionError(13, "Permission denied", folder)

    monkeypatch.setattr(lease.Lease, "read", read_only)
    monkeypatch.setattr(ray_runtime, "init_ray", lambda *a, **k: (_ for _ in ()).throw(RayStarted()))
    with pytest.raises(RayStarted):
        run_predict(str(untrained_checkpoint), str(tmp_path / "out"), parquet=parquet)
    assert "cannot mark " in caplog.text and "an ingest into it while this command runs is not refused" in caplog.text
