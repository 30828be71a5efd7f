"""HTTP request handling for ``POST /detect``, kept free of Ray: body limits, content types, query
values, image decoding. Every client mistake becomes a :class:`RequestError` with a 4xx status."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from centernet_ray.data.images import ImageDecodeError, decode_image
from centernet_ray.detector import letterbox_batch

MULTIPART_FIELDS = ("image", "file")


ERROR_KINDS = {400: "bad_request", 401: "unauthorized", 413: "too_large", 415: "unsupported_media_type",
               422: "invalid_parameter"}


class RequestError(Exception):
    """A client error: ``status`` (4xx) and a message that says what to send instead. ``kind`` names
    the error in the endpoint's metrics; ``close`` asks to close the connection after the answer."""

    def __init__(self, status: int, message: str, kind: str | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or ERROR_KINDS.get(status, "client_error")
        self.close = close


@dataclass(frozen=True)
class DetectParams:
    score_threshold: float
    max_detections: int
    format: str  # "json" or "png"


def parse_params(query: Mapping[str, str], default_threshold: float, max_detections_limit: int) -> DetectParams:
    """``score_threshold`` in [0, 1], ``max_detections`` in [1, limit], ``format`` json|png."""
    unknown = sorted(set(query) - {"score_threshold", "max_detections", "format"})
    if unknown:
        raise RequestError(422, f"unknown query parameter {unknown[0]!r}; valid: score_threshold, max_detections, format")
    threshold = _number(query, "score_threshold", float, default_threshold)
    if not 0.0 <= threshold <= 1.0:
        raise RequestError(422, f"score_threshold must be in [0, 1]; got {threshold}")
    limit = _number(query, "max_detections", int, max_detections_limit)
    if not 1 <= limit <= max_detections_limit:
        raise RequestError(422, f"max_detections must be in [1, {max_detections_limit}]; got {limit}")
    fmt = query.get("format", "json")
    if fmt not in ("json", "png"):
        raise RequestError(422, f"format must be json or png; got {fmt!r}")
    return DetectParams(threshold, limit, fmt)


def _number(query: Mapping[str, str], name: str, kind: type, default: Any) -> Any:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise RequestError(422, f"{name} must be {'an integer' if kind is int else 'a number'}; got {raw!r}") from None
    if kind is float and value != value:  # NaN
        raise RequestError(422, f"{name} must be a number; got {raw!r}")
    return value


DRAIN_TIMEOUT_S = 10.0  # a client that stops sending mid-body does not hold an ingress slot longer


async def read_body(request: Any, max_bytes: int, drain_bytes: int = 0) -> bytes:
    """The request body, refused with 413 once it passes ``max_bytes`` (declared or streamed).

    Before answering 413 the rest of the body is read and dropped, up to ``drain_bytes`` in all and
    for at most ``DRAIN_TIMEOUT_S``: a client that sends the whole body before reading (Python's
    urllib) then gets the 413 instead of a connection reset. Beyond either bound the body is not
    read further (the answer says ``Connection: close``)."""
    declared = request.headers.get("content-length")
    stream = request.stream()  # one iterator: the drain goes on where the reading stopped
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        if int(declared) <= drain_bytes:
            await _drain(stream, drain_bytes)
        raise RequestError(413, f"request body of {int(declared)} bytes exceeds the limit of {max_bytes}", close=True)
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > max_bytes:
            await _drain(stream, drain_bytes - size)
            raise RequestError(413, f"request body exceeds the limit of {max_bytes} bytes", close=True)
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(stream: Any, budget: int) -> None:
    """Read and drop what is left of ``stream``, at most ``budget`` bytes and ``DRAIN_TIMEOUT_S``;
    a client that disconnects meanwhile ends it (it will not read the answer)."""
    from starlette.requests import ClientDisconnect

    async def drop() -> None:
        nonlocal budget
        async for chunk in stream:
            budget -= len(chunk)
            if budget <= 0:
                return

    if budget <= 0:
        return
    try:
        await asyncio.wait_for(drop(), DRAIN_TIMEOUT_S)
    except (asyncio.TimeoutError, ClientDisconnect):
        pass


async def image_bytes(request: Any, max_bytes: int, drain_bytes: int = 0) -> bytes:
    """The image of a ``POST /detect``: a raw body with an ``image/*`` content type, or the ``image``
    (or ``file``) field of a ``multipart/form-data`` upload."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith("image/"):
        data = await read_body(request, max_bytes, drain_bytes)
    elif content_type == "multipart/form-data":
        data = await _multipart_image(request, max_bytes, drain_bytes)
    else:
        raise RequestError(415, f"unsupported content type {content_type or '(none)'!r}: send the image bytes with "
                                "an image/* content type, or a multipart/form-data upload with an 'image' field")
    if not data:
        raise RequestError(400, "empty request body: send the image bytes")
    return data


async def _multipart_image(request: Any, max_bytes: int, drain_bytes: int = 0) -> bytes:
    """The file field of a multipart upload. The body is read (bounded, as a raw one) before it is
    parsed: Starlette's parser caps form fields but spools file parts to disk without a limit, so a
    chunked upload with no Content-Length could fill the disk."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    body = await read_body(request, max_bytes, drain_bytes)
    delivered = False

    async def replay() -> dict[str, Any]:  # the ASGI receive of a request whose body is ``body``
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=10, max_part_size=max_bytes)
    except Exception as exc:  # starlette raises MultiPartException / HTTPException for malformed bodies
        raise RequestError(400, f"malformed multipart body: {getattr(exc, 'detail', None) or exc}") from None
    try:
        upload = next((form.get(name) for name in MULTIPART_FIELDS if isinstance(form.get(name), UploadFile)), None)
        if upload is None:
            raise RequestError(400, "the multipart upload has no file field named 'image' (or 'file')")
        return await upload.read()
    finally:
        await form.close()


def letterbox_request_image(image: torch.Tensor, input_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the ingress sends to a model replica for one decoded image (uint8 [3, H, W]): the
    letterboxed input (uint8 [3, H_in, W_in]), its input->original affine [2, 3] and the original
    (width, height); the full-size image stays at the ingress."""
    batch = letterbox_batch([image], input_size)
    return batch.images[0].numpy(), batch.input_to_original[0].numpy(), batch.original_size[0].numpy()


def decode_request_image(data: bytes, max_pixels: int) -> torch.Tensor:
    """uint8 [3, H, W]; 413 for an image over ``max_pixels`` (checked before decoding), 400 otherwise."""
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        status = 413 if "exceeds the limit" in str(exc) or "decompression bomb" in str(exc).lower() else 400
        raise RequestError(status, f"cannot use the image: {exc}") from None
