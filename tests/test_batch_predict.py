"""Which images ``centernet-ray predict --images DIR --annotations JSON`` predicts and scores (no Ray)."""

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
