"""The detection endpoint on real Ray Serve, called over real HTTP on 127.0.0.1."""

import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from centernet_ray.config import load_config

pytestmark = pytest.mark.integration

MAX_BODY = 2_000_000


@pytest.fixture(scope="module")
def endpoint(ray_session, trained_checkpoint, serve_port):
    import requests
    from ray import serve

    from centernet_ray.ray_serve.launch import APP_NAME, start_app

    checkpoint, _ = trained_checkpoint
    config = load_config(None, [f"serve.port={serve_port}", f"serve.max_body_bytes={MAX_BODY}",
                                "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.02", "serve.score_threshold=0.3"])
    url = start_app(config, str(checkpoint))
    assert requests.get(f"{url}/healthz", timeout=60).status_code == 200
    yield url
    serve.delete(APP_NAME)


def train_images(trained_checkpoint):
    _, dataset = trained_checkpoint
    annotations = json.loads((dataset / "annotations" / "instances_train.json").read_text())
    return dataset, annotations


def post_image(url, data, content_type="image/jpeg", **params):
    import requests

    return requests.post(f"{url}/detect", data=data, headers={"Content-Type": content_type}, params=params, timeout=60)


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_the_trained_checkpoint_detects_the_objects_of_a_synthetic_image(endpoint, trained_checkpoint):
    dataset, annotations = train_images(trained_checkpoint)
    names = {c["id"]: c["name"] for c in annotations["categories"]}
    for record in annotations["images"][:4]:
        response = post_image(endpoint, (dataset / "images" / "train" / record["file_name"]).read_bytes())
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["image_size"] == [record["width"], record["height"]] and body["model"].endswith("@epoch300")
        truth = [a for a in annotations["annotations"] if a["image_id"] == record["id"]]
        for ann in truth:  # every object found: right class, IoU >= 0.5 (boxes in original pixels)
            x, y, w, h = ann["bbox"]
            matches = [d for d in body["detections"] if d["category_id"] == ann["category_id"]
                       and d["label"] == names[ann["category_id"]] and iou(d["bbox"], [x, y, x + w, y + h]) >= 0.5]
            assert matches, (ann, body["detections"])
        assert len(body["detections"]) <= len(truth) + 1 and all(d["score"] > 0.3 for d in body["detections"])


def test_multipart_upload_and_png_rendering(endpoint, trained_checkpoint):
    import requests

    dataset, annotations = train_images(trained_checkpoint)
    data = (dataset / "images" / "train" / annotations["images"][0]["file_name"]).read_bytes()
    raw = post_image(endpoint, data).json()
    upload = requests.post(f"{endpoint}/detect", files={"image": ("a.jpg", data, "image/jpeg")}, timeout=60)
    assert upload.status_code == 200 and upload.json() == raw
    png = post_image(endpoint, data, format="png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == tuple(raw["image_size"])
    limited = post_image(endpoint, data, score_threshold=0.0, max_detections=3).json()
    assert len(limited["detections"]) == 3


def _png(width, height, mode="1"):
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(size=(64, 64)):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _dds_of_unknown_pixel_format() -> bytes:
    """Bytes Pillow identifies as DDS and then fails on with NotImplementedError (not an OSError)."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="DDS")
    data = bytearray(buffer.getvalue())
    data[80:84] = bytes(4)  # the pixel format's flags
    return bytes(data)


BAD_REQUESTS = {
    "empty body": (lambda: (b"", "image/jpeg", {}), 400, "empty request body"),
    "not an image": (lambda: (b"hello, this is text" * 10, "image/jpeg", {}), 400, "not a readable image"),
    "truncated jpeg": (lambda: (_jpeg()[:300], "image/jpeg", {}), 400, "cannot use the image"),
    "image a plugin cannot parse": (lambda: (_dds_of_unknown_pixel_format(), "image/jpeg", {}), 400,
                                    "NotImplementedError: Unknown pixel format"),
    "decompression bomb": (lambda: (_png(8000, 8000), "image/png", {}), 413, "exceeds the limit"),
    "body over the limit": (lambda: (b"\xff" * (MAX_BODY + 1), "image/jpeg", {}), 413, "exceeds the limit"),
    "wrong content type": (lambda: (_jpeg(), "text/plain", {}), 415, "unsupported content type"),
    "json body": (lambda: (b'{"image": "x"}', "application/json", {}), 415, "unsupported content type"),
    "threshold not a number": (lambda: (_jpeg(), "image/jpeg", {"score_threshold": "high"}), 422, "score_threshold"),
    "threshold out of range": (lambda: (_jpeg(), "image/jpeg", {"score_threshold": "1.5"}), 422, "[0, 1]"),
    "threshold nan": (lambda: (_jpeg(), "image/jpeg", {"score_threshold": "nan"}), 422, "score_threshold"),
    "zero detections": (lambda: (_jpeg(), "image/jpeg", {"max_detections": "0"}), 422, "max_detections"),
    "fractional detections": (lambda: (_jpeg(), "image/jpeg", {"max_detections": "2.5"}), 422, "integer"),
    "unknown format": (lambda: (_jpeg(), "image/jpeg", {"format": "gif"}), 422, "json or png"),
    "unknown parameter": (lambda: (_jpeg(), "image/jpeg", {"thresh": "0.1"}), 422, "unknown query parameter"),
    "malformed multipart": (lambda: (b"--x\r\nnonsense", "multipart/form-data; boundary=x", {}), 400, "multipart"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_json_error_and_the_service_answers_the_next_request(endpoint, case):
    make, status, message = BAD_REQUESTS[case]
    data, content_type, params = make()
    response = post_image(endpoint, data, content_type, **params)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert post_image(endpoint, _jpeg()).status_code == 200


def test_multipart_without_an_image_field_is_a_400(endpoint):
    import requests

    response = requests.post(f"{endpoint}/detect", files={"photo": ("a.jpg", _jpeg(), "image/jpeg")}, timeout=60)
    assert response.status_code == 400 and "'image'" in response.json()["error"]


def test_32_concurrent_requests_all_succeed_with_the_single_request_answers(endpoint, trained_checkpoint):
    dataset, annotations = train_images(trained_checkpoint)
    images = [(dataset / "images" / "train" / r["file_name"]).read_bytes() for r in annotations["images"]]
    alone = [post_image(endpoint, data).json() for data in images]
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda i: post_image(endpoint, images[i % len(images)]), range(32)))
    assert all(r.status_code == 200 for r in responses)
    for i, response in enumerate(responses):  # batched with others: the same detections
        got, want = response.json()["detections"], alone[i % len(images)]["detections"]
        assert [d["category_id"] for d in got] == [d["category_id"] for d in want]
        np.testing.assert_allclose([d["bbox"] + [d["score"]] for d in got], [d["bbox"] + [d["score"]] for d in want],
                                   atol=1e-4)


def test_healthz_and_metadata(endpoint, trained_checkpoint):
    import requests

    health = requests.get(f"{endpoint}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    meta = requests.get(f"{endpoint}/metadata", timeout=30).json()
    assert [c["label"] for c in meta["classes"]] == ["circle", "rectangle", "triangle", "cross"]
    assert [c["category_id"] for c in meta["classes"]] == [1, 2, 3, 4]
    assert meta["input_size"] == {"height": 64, "width": 64} and meta["max_batch_size"] == 8
    assert meta["checkpoint_source"] == str(trained_checkpoint[0]) and meta["max_body_bytes"] == MAX_BODY
    schema = requests.get(f"{endpoint}/openapi.json", timeout=30)  # no API keys: the schema is open
    assert schema.status_code == 200 and {"/detect", "/healthz", "/metadata"} <= set(schema.json()["paths"])
    for page in ("docs", "redoc"):
        docs = requests.get(f"{endpoint}/{page}", timeout=30)
        assert docs.status_code == 200 and "/openapi.json" in docs.text, page


def test_endpoint_detections_equal_predict_on_the_same_images(endpoint, trained_checkpoint, tmp_path):
    from centernet_ray.ray_data.batch_predict import run_predict

    checkpoint, dataset = trained_checkpoint
    image_dir = dataset / "images" / "train"
    result = run_predict(str(checkpoint), str(tmp_path / "pred"), images=str(image_dir), k=100, score_threshold=0.3)
    predicted = json.loads((tmp_path / "pred" / "detections.json").read_text())
    files = json.loads((tmp_path / "pred" / "images.json").read_text())
    assert result.images == len(files) == 8
    for image_id, path in files.items():
        served = post_image(endpoint, Path(path).read_bytes(), score_threshold=0.3, max_detections=100).json()
        ours = sorted(([d["category_id"], d["score"], *d["bbox"]] for d in served["detections"]), key=lambda r: -r[1])
        theirs = sorted(([d["category_id"], d["score"], d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2],
                          d["bbox"][1] + d["bbox"][3]] for d in predicted if d["image_id"] == int(image_id)),
                        key=lambda r: -r[1])
        assert len(ours) == len(theirs) and len(ours) > 0
        np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-4, rtol=0)
        assert not any(math.isnan(v) for row in ours for v in row)
