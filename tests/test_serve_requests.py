"""The endpoint's Ray-free parts: API keys, the drained 413, the ingress letterbox and the replica's
re-letterbox after a swap to another input size."""

import asyncio
import json

import numpy as np
import pytest
import torch

from centernet_ray.detector import letterbox_batch
from centernet_ray.errors import UserInputError
from centernet_ray.ray_serve.auth import API_KEYS_ENV, ApiKeys
from centernet_ray.ray_serve.requests import RequestError, image_bytes, letterbox_request_image, read_body


def test_keys_from_a_file_skip_comments_and_need_a_bearer_token(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# production\n\n  alpha-key  \nbeta-key\n")
    keys = ApiKeys.load(str(path))
    assert keys.required
    assert keys.allows("Bearer alpha-key") and keys.allows("bearer beta-key") and keys.allows("Bearer  beta-key ")
    for header in (None, "", "Bearer", "Bearer gamma", "Basic alpha-key", "alpha-key", "Bearer # production"):
        assert not keys.allows(header), header
    assert ApiKeys.load(f"file://{path}").allows("Bearer beta-key")  # a URI, as s3:// is read


def test_keys_from_the_environment_and_none_means_open(monkeypatch):
    monkeypatch.setenv(API_KEYS_ENV, "one, two ,")
    keys = ApiKeys.load("")
    assert keys.allows("Bearer one") and keys.allows("Bearer two") and not keys.allows("Bearer ")
    monkeypatch.delenv(API_KEYS_ENV)
    assert not ApiKeys.load("").required and ApiKeys.load("").allows(None)


def test_a_keys_file_that_is_missing_or_empty_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="cannot read"):
        ApiKeys.load(str(tmp_path / "absent"))
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(UserInputError, match="holds no key"):
        ApiKeys.load(str(tmp_path / "empty"))


def _request(chunks, declared=None, content_type=None):
    """A real Starlette request whose body arrives as ``chunks`` (the ASGI messages uvicorn sends);
    after the last chunk with ``more_body`` set, the client stops sending. Returns (request, bytes read)."""
    from starlette.requests import Request

    messages = [{"type": "http.request", "body": chunk, "more_body": True} for chunk in chunks]
    if messages and declared is None or (declared is not None and sum(map(len, chunks)) >= declared):
        messages[-1]["more_body"] = False  # the whole body was sent
    read = {"bytes": 0}

    async def receive():
        if messages:
            message = messages.pop(0)
            read["bytes"] += len(message["body"])
            return message
        await asyncio.sleep(3600)  # a client that stopped sending mid-body

    headers = [(b"content-length", str(declared).encode())] if declared is not None else []
    if content_type:
        headers.append((b"content-type", content_type.encode()))
    scope = {"type": "http", "method": "POST", "path": "/detect", "query_string": b"", "headers": headers}
    return Request(scope, receive), read


@pytest.mark.parametrize("declared", [True, False])
def test_an_oversized_body_is_drained_up_to_the_bound_before_the_413(declared):
    request, read = _request([b"x" * 1000] * 50, declared=50_000 if declared else None)
    with pytest.raises(RequestError) as caught:
        asyncio.run(read_body(request, max_bytes=10_000, drain_bytes=100_000))
    assert caught.value.status == 413 and caught.value.close and caught.value.kind == "too_large"
    assert read["bytes"] == 50_000  # all of it read: the client gets to read the answer


def test_a_body_whose_last_chunk_crosses_the_limit_is_a_413_not_a_500():
    request, _ = _request([b"x" * 9_000, b"x" * 2_000])  # chunked: no content-length
    with pytest.raises(RequestError) as caught:
        asyncio.run(read_body(request, max_bytes=10_000, drain_bytes=100_000))
    assert caught.value.status == 413


def test_a_body_beyond_the_drain_bound_is_not_read_further():
    declared, read = _request([b"x" * 1000] * 500, declared=500_000)
    with pytest.raises(RequestError):
        asyncio.run(read_body(declared, max_bytes=10_000, drain_bytes=100_000))
    assert read["bytes"] == 0  # declared too large to drain: answered at once
    streamed, read = _request([b"x" * 1000] * 500)
    with pytest.raises(RequestError):
        asyncio.run(read_body(streamed, max_bytes=10_000, drain_bytes=100_000))
    assert 100_000 <= read["bytes"] <= 101_000


def _multipart(payload: bytes, boundary: str = "b0undary") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_a_multipart_upload_gives_its_file_field():
    body, content_type = _multipart(b"\xff\xd8 image bytes")
    request, _ = _request([body[:10], body[10:]], content_type=content_type)
    assert asyncio.run(image_bytes(request, max_bytes=10_000)) == b"\xff\xd8 image bytes"


def test_a_chunked_multipart_upload_is_bounded_like_a_raw_body():
    """No Content-Length: Starlette's parser would spool the file part to disk whatever its size."""
    body, content_type = _multipart(b"x" * 500_000)
    chunks = [body[i:i + 1000] for i in range(0, len(body), 1000)]
    request, read = _request(chunks, content_type=content_type)
    with pytest.raises(RequestError) as caught:
        asyncio.run(image_bytes(request, max_bytes=10_000, drain_bytes=100_000))
    assert caught.value.status == 413 and caught.value.close
    assert read["bytes"] <= 101_000  # read up to the drain bound, not to the end


def test_a_client_that_stops_sending_gets_its_413_after_the_drain_timeout(monkeypatch):
    from centernet_ray.ray_serve import requests as module

    monkeypatch.setattr(module, "DRAIN_TIMEOUT_S", 0.3)
    request, read = _request([b"x" * 100], declared=50_000)  # declares 50 KB, sends 100 bytes, waits
    with pytest.raises(RequestError) as caught:
        asyncio.run(asyncio.wait_for(read_body(request, max_bytes=10_000, drain_bytes=100_000), 5))
    assert caught.value.status == 413 and read["bytes"] == 100


def test_the_ingress_sends_the_letterboxed_input_not_the_image():
    image = torch.randint(0, 256, (3, 2160, 3840), dtype=torch.uint8)  # a 4K photo: 24.9 MB decoded
    prepared, matrix, size = letterbox_request_image(image, (128, 128))
    assert prepared.shape == (3, 128, 128) and prepared.dtype == np.uint8  # 49 KB
    direct = letterbox_batch([image], (128, 128))
    np.testing.assert_array_equal(prepared, direct.images[0].numpy())
    np.testing.assert_array_equal(matrix, direct.input_to_original[0].numpy())
    assert size.tolist() == [3840, 2160]


def test_a_replica_with_another_input_size_letterboxes_again_and_composes_the_mapping():
    from centernet_ray.ray_serve.app import _fit_to_input

    image = torch.randint(0, 256, (3, 300, 500), dtype=torch.uint8)
    prepared, matrix, _ = letterbox_request_image(image, (64, 64))
    images, matrices = _fit_to_input([torch.from_numpy(prepared)], [torch.from_numpy(matrix)], (128, 96))
    assert images.shape == (1, 3, 128, 96)
    direct = letterbox_batch([image], (128, 96)).input_to_original[0]
    corners = torch.tensor([[0.0, 0.0, 1.0], [96.0, 128.0, 1.0], [48.0, 64.0, 1.0]])
    # the same original pixels as letterboxing the original directly, within the rounding of two crops
    torch.testing.assert_close(corners @ matrices[0].T, corners @ direct.T, atol=8.0, rtol=0)


@pytest.mark.parametrize("signum,on_a_cluster", [("SIGINT", False), ("SIGTERM", False), ("SIGTERM", True)])
def test_serve_forever_shuts_serve_down_on_sigint_and_sigterm(monkeypatch, signum, on_a_cluster):
    """The signal handling of `centernet-ray serve` (the real process: test_serve_production.py);
    Serve itself is replaced by recorders here. On a cluster it joined, only its application goes."""
    import os
    import signal
    import threading

    from ray import serve

    from centernet_ray.config import load_config
    from centernet_ray.ray_serve import launch

    calls = []
    monkeypatch.setattr(launch, "start_app", lambda *args, **kwargs: calls.append("start") or "http://127.0.0.1:1")
    monkeypatch.setattr(launch, "metrics_url", lambda: None)
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(serve, "delete", lambda name: calls.append(f"delete {name}"))
    if on_a_cluster:
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    before = signal.getsignal(getattr(signal, signum))
    threading.Timer(0.5, os.kill, (os.getpid(), getattr(signal, signum))).start()
    assert launch.serve_forever(load_config(None), "ckpt") == signum
    assert calls == ["start", "delete centernet" if on_a_cluster else "shutdown"]
    assert signal.getsignal(getattr(signal, signum)) is before


def test_a_fault_behind_a_valid_request_is_a_counted_json_500_not_a_bare_one():
    """The model replica failing (here: its handle raises) is the endpoint's fault: the client gets
    JSON as for every other error, and the errors metric counts it as internal_error; with no replica
    answering at all, /metadata is such a 500 and /healthz a JSON 503 (the probe's "not ready")."""
    import io

    from PIL import Image

    from centernet_ray.config import ServeConfig
    from centernet_ray.ray_serve.app import DetectionAPI
    from centernet_ray.ray_serve.auth import ApiKeys

    class FailingModel:
        class metadata:  # noqa: N801 - mirrors DeploymentHandle.metadata.remote()
            @staticmethod
            async def remote():
                return {"model_version": "v1", "input_size": {"height": 64, "width": 64}}

        @staticmethod
        async def remote(*_):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    answered = []
    ingress = object.__new__(DetectionAPI.func_or_class)  # the handler's class without Serve's ASGI wrapper
    ingress.model, ingress.settings, ingress.keys, ingress._input = FailingModel(), ServeConfig(), ApiKeys([]), None
    ingress.metrics = type("Recorder", (), {"answered": lambda self, *args: answered.append(args)})()
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (10, 200, 30)).save(buffer, format="JPEG")
    request, _ = _request([buffer.getvalue()], declared=len(buffer.getvalue()), content_type="image/jpeg")
    response = asyncio.run(ingress.detect(request))
    assert response.status_code == 500 and response.media_type == "application/json"
    assert b'"status":500' in response.body and b"CUDA" not in response.body  # the traceback is in the log only
    assert answered == [("/detect", 500, "internal_error")]

    class GoneModel:
        class metadata:  # noqa: N801
            @staticmethod
            async def remote():
                raise RuntimeError("ActorDiedError: the replica's process died")

    ingress.model = GoneModel()
    health = asyncio.run(ingress.healthz())
    assert health.status_code == 503 and health.media_type == "application/json"
    assert json.loads(health.body) == {"error": "unavailable: the model replica did not answer (the endpoint's log "
                                                "has why)", "status": 503}
    metadata = asyncio.run(ingress.metadata(_request([])[0]))
    assert metadata.status_code == 500 and json.loads(metadata.body)["status"] == 500
    assert answered[1:] == [("/metadata", 500, "internal_error")]
    ingress.model = FailingModel()  # a replica that answers again: healthy
    assert json.loads(asyncio.run(ingress.healthz()).body) == {"status": "ok", "model": "v1"}


def test_a_moved_alias_whose_version_fails_to_load_is_not_loaded_again_at_every_poll(monkeypatch):
    from centernet_ray import checkpoint
    from centernet_ray.ray_serve.app import DetectionModel, ServedState

    class RegistryExhausted(BaseException):  # ends the poll loop (which keeps serving on an Exception)
        pass

    answers = iter(["shapes/2"] * 6 + ["shapes/3"] * 3)  # the alias moves to 2 (broken), then to 3

    def resolve(source, _uri):
        try:
            return source, next(answers)
        except StopIteration:
            raise RegistryExhausted from None

    loads = []

    def load(source):
        loads.append(version := f"shapes/{len(loads) + 2}")
        if version == "shapes/2":
            raise RuntimeError("unpickling error: the checkpoint of version 2 is corrupt")
        return ServedState(None, None, version, source)

    async def in_this_thread(fn, *args):
        return fn(*args)

    monkeypatch.setattr(checkpoint, "resolve_model_uri", resolve)
    monkeypatch.setattr("asyncio.to_thread", in_this_thread)
    replica = object.__new__(DetectionModel.func_or_class)  # the replica's class without Serve around it
    replica.poll_s, replica.tracking_uri, replica._load = 0.001, None, load
    replica.state = ServedState(None, None, "shapes/1", "models:/shapes@champion")
    replica.metrics = type("Recorder", (), {"swaps": type("Counter", (), {"inc": lambda self: None})()})()
    with pytest.raises(RegistryExhausted):
        asyncio.run(asyncio.wait_for(replica._follow_alias(), 10))
    assert loads == ["shapes/2", "shapes/3"] and replica.state.version == "shapes/3"
