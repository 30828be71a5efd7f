"""The Serve application: a FastAPI ingress composed with a batched model deployment.

``DetectionAPI`` (ingress, CPU) checks the API key, reads, decodes and letterboxes each request, so
that only input-size uint8 arrays travel to the model; ``DetectionModel`` gathers them with
``@serve.batch`` and runs the network and ``decode`` (3x3 max-pool peaks + top-K, no NMS) for the
whole batch on its device. The model's checkpoint is the deployment's ``user_config`` (Serve calls
``reconfigure`` with it), and a moved ``models:/NAME@ALIAS`` alias found by polling swaps the
weights inside the running replicas; requests in flight finish on the old model.
``build_app`` is the import path for ``serve run`` / ``serve deploy`` (see cluster/serve.yaml) and
for ``centernet-ray serve``.
"""


import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from centernet_ray.config import ServeConfig, config_from_dict
from centernet_ray.errors import UserInputError
from centernet_ray.ray_serve.auth import ApiKeys
from centernet_ray.ray_serve.metrics import IngressMetrics, ModelMetrics
from centernet_ray.ray_serve.requests import (DetectParams, RequestError, decode_request_image, image_bytes,
                                              letterbox_request_image, parse_params)

log = logging.getLogger(__name__)

# FastAPI's own /docs and /openapi.json would answer without the API key: the ingress serves them
# itself, behind the same check as /detect.
api = FastAPI(title="centernet-ray", description="CenterNet object detection",
              openapi_url=None, docs_url=None, redoc_url=None)


@dataclass(frozen=True)
class ServedState:
    """The model a replica answers with; replaced as a whole on a swap."""

    detector: Any  # centernet_ray.detector.Detector
    loaded: Any  # centernet_ray.checkpoint.LoadedModel
    version: str
    source: str


# A stopping replica finishes its requests in flight for at most 10 s (Serve's default: 20 s): the two
# deployments stop one after the other, and with Serve's defaults a loaded endpoint could outlast the
# 30 s Kubernetes gives a pod between SIGTERM and SIGKILL. The check interval stays Serve's 2 s: its
# first wait is the time routers get to stop sending to the replica, and at 0.5 s a redeploy under
# load answered a request 500 (tests/test_serve_production.py, in one of four suite runs).
SHUTDOWN_OPTIONS = {"graceful_shutdown_timeout_s": 10.0}


def replica_device() -> torch.device:
    """CUDA when Ray gave this replica a GPU (``serve.num_gpus`` > 0), else the CPU. Not whether the
    node has one: Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for an actor that asked for no GPU, so
    such a replica sees every GPU of its node, ones that training workers or other replicas hold."""
    return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")


@serve.deployment(name="DetectionModel")
class DetectionModel:
    """One model replica: batches of letterboxed images in, detections (original pixels) out."""

    def __init__(self, flip_test: bool = False, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
                 tracking_uri: str | None = None, poll_s: float = 0.0, amp: str = "none") -> None:
        self.device = replica_device()
        self.flip_test, self.tracking_uri, self.poll_s, self.amp = flip_test, tracking_uri, poll_s, amp
        self.max_batch_size = max_batch_size
        self.detect_batch.set_max_batch_size(max_batch_size)
        self.detect_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.state: ServedState | None = None
        self.metrics = ModelMetrics()
        self._poller: asyncio.Task | None = None

    def _load(self, source: str) -> ServedState:
        from centernet_ray.checkpoint import load_served_model
        from centernet_ray.detector import Detector

        served = load_served_model(source, self.device, self.tracking_uri)
        detector = Detector(served.loaded.model, served.loaded.config.data.input_size, self.device, self.flip_test,
                            amp=self.amp)
        log.info("DetectionModel %s on %s (amp %s), batches of up to %d", served.version, self.device, self.amp,
                 self.max_batch_size)
        return ServedState(detector, served.loaded, served.version, source)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this at start and whenever the deployment's ``user_config`` changes."""
        from centernet_ray.checkpoint import names_an_alias

        source = user_config["checkpoint"]
        if self.state is None or source != self.state.source:
            self._swap(await asyncio.to_thread(self._load, source))
        if self._poller is not None and self._poller.done():
            self._poller = None
        if self.poll_s > 0 and names_an_alias(source) and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._follow_alias())

    def _swap(self, state: ServedState) -> None:
        if self.state is not None:
            log.info("model swapped in place: %s -> %s", self.state.version, state.version)
            self.metrics.swaps.inc()
        self.state = state  # one assignment: a batch uses the state it started with

    async def _follow_alias(self) -> None:
        """Re-resolve the alias every ``poll_s``; load a moved one beside the current model, then swap.
        A version that fails to load is not tried again until the alias moves on."""
        from centernet_ray.checkpoint import names_an_alias, resolve_model_uri

        tried: tuple[str, str] | None = None  # (source, version) last loaded, or tried and failed
        while True:
            await asyncio.sleep(self.poll_s)
            state = self.state
            if not names_an_alias(state.source):
                return  # reconfigured to a fixed checkpoint: nothing to follow
            try:
                _, version = await asyncio.to_thread(resolve_model_uri, state.source, self.tracking_uri)
                if version == state.version or (state.source, version) == tried:
                    continue
                tried = (state.source, version)
                loaded = await asyncio.to_thread(self._load, state.source)
                if self.state is state:  # a reconfigure meanwhile wins over the alias
                    self._swap(loaded)
            except Exception as exc:  # the registry unreachable or a bad new version: keep serving the current one
                log.warning("could not follow %s (still serving %s): %s", state.source, state.version, exc)

    def metadata(self) -> dict[str, Any]:
        state = self.state
        height, width = state.detector.input_size
        return {"model_version": state.version, "checkpoint_source": state.source,
                "classes": [{"category_id": c, "label": n}
                            for c, n in zip(state.loaded.category_ids, state.loaded.class_names)],
                "input_size": {"height": height, "width": width}, "epoch": state.loaded.epoch,
                "device": str(state.detector.device), "flip_test": state.detector.flip_test,
                "max_batch_size": self.max_batch_size, "replica": serve.get_replica_context().replica_tag}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def detect_batch(self, inputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], max_detections: list[int],
                           thresholds: list[float]) -> list[dict[str, Any]]:
        """inputs: (letterboxed uint8 [3, H_in, W_in], input->original [2, 3], original (w, h)) per request."""
        state, started = self.state, time.perf_counter()
        # torch.tensor copies: arrays from Ray's object store are read-only (torch warns on from_numpy)
        images, matrices = _fit_to_input([torch.tensor(i[0]) for i in inputs],
                                         [torch.tensor(i[1]) for i in inputs], state.detector.input_size)
        sizes = torch.from_numpy(np.stack([i[2] for i in inputs]))
        found = state.detector.detect(images, matrices, sizes, k=max(max_detections), score_threshold=0.0)
        answers = []
        for det, limit, threshold in zip(found, max_detections, thresholds):
            keep = np.flatnonzero(det.scores > threshold)[:limit]  # scores come sorted, highest first
            answers.append({"model": state.version, "labels": state.loaded.class_names, "detections": [
                {"bbox": [float(v) for v in det.boxes[i]], "score": float(det.scores[i]),
                 "category_id": int(state.loaded.category_ids[det.classes[i]]),
                 "label": state.loaded.class_names[det.classes[i]]} for i in keep]})
            self.metrics.detections.observe(len(keep))
        self.metrics.batch_size.observe(len(inputs))
        self.metrics.latency_ms.observe(1e3 * (time.perf_counter() - started))
        return answers

    async def __call__(self, prepared: tuple[np.ndarray, np.ndarray, np.ndarray], max_detections: int,
                       threshold: float) -> dict[str, Any]:
        return await self.detect_batch(prepared, max_detections, threshold)


def _fit_to_input(images: list[torch.Tensor], matrices: list[torch.Tensor],
                  input_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the letterboxed inputs; one letterboxed for another input size (the ingress had not yet
    seen a swap to a model with another size) is letterboxed again, its affine composed."""
    from centernet_ray.detector import letterbox_batch

    for j, image in enumerate(images):
        if tuple(image.shape[-2:]) != tuple(input_size):
            again = letterbox_batch([image], input_size)
            outer = torch.cat([matrices[j], torch.tensor([[0.0, 0.0, 1.0]])])  # [3, 3] first input -> original
            inner = torch.cat([again.input_to_original[0], torch.tensor([[0.0, 0.0, 1.0]])])
            images[j], matrices[j] = again.images[0], (outer @ inner)[:2]
    return torch.stack(images), torch.stack(matrices)


def _error(exc: RequestError) -> JSONResponse:
    headers = {"Connection": "close"} if exc.close else {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": exc.message, "status": exc.status}, status_code=exc.status, headers=headers)


def _schema_url(request: Request) -> str:
    """``/openapi.json`` under the application's route prefix (Serve's ``root_path``). Defined above
    the deployment: ``@serve.deployment`` serialises the class, with the globals it names, at once."""
    return (request.scope.get("root_path") or "").rstrip("/") + "/openapi.json"


@serve.deployment(name="DetectionAPI")
@serve.ingress(api)
class DetectionAPI:
    """HTTP front: authenticates, validates, decodes and letterboxes requests (never a 5xx for a
    client error)."""

    def __init__(self, model: DeploymentHandle, settings: ServeConfig, keys_required: bool = False) -> None:
        self.model = model
        self.settings = settings
        self.keys = ApiKeys.load(settings.api_keys_file)
        if keys_required and not self.keys.required:  # never serve openly what was meant to be closed
            raise UserInputError(f"API keys were found where the app was deployed but not in this replica's "
                                 f"environment: set serve.api_keys_file to a file every node can read")
        self.metrics = IngressMetrics()
        self._input: tuple[str, tuple[int, int]] | None = None  # (model version, its input size)

    def _authorize(self, request: Request) -> None:
        if not self.keys.allows(request.headers.get("authorization")):
            raise RequestError(401, "missing or unknown API key: send the header 'Authorization: Bearer <key>'")

    async def _input_size(self) -> tuple[int, int]:
        if self._input is None:
            metadata = await self.model.metadata.remote()
            size = metadata["input_size"]
            self._input = (metadata["model_version"], (size["height"], size["width"]))
        return self._input[1]

    @api.post("/detect")
    async def detect(self, request: Request) -> Response:
        started, settings = time.perf_counter(), self.settings
        try:
            self._authorize(request)
            params = parse_params(request.query_params, settings.score_threshold, settings.max_detections)
            data = await image_bytes(request, settings.max_body_bytes, settings.max_drain_bytes)
            image = await asyncio.to_thread(decode_request_image, data, settings.max_image_pixels)
        except RequestError as exc:
            self.metrics.answered("/detect", exc.status, exc.kind)
            return _error(exc)
        try:
            response = await self._answer(image, params)
        except Exception:  # a fault of the endpoint, not of the request: counted, logged, a JSON 500
            return self._internal_error("POST", "/detect")
        self.metrics.answered("/detect", 200)
        self.metrics.latency_ms.observe(1e3 * (time.perf_counter() - started))
        return response

    async def _answer(self, image: torch.Tensor, params: DetectParams) -> Response:
        """The detections of a decoded image (uint8 [3, H, W]) as JSON, or drawn on it as a PNG."""
        width, height = int(image.shape[2]), int(image.shape[1])
        prepared = await asyncio.to_thread(letterbox_request_image, image, await self._input_size())
        if params.format != "png":
            image = None  # only the drawing needs the full-size pixels: not held while the model answers
        answer = await self.model.remote(prepared, params.max_detections, params.score_threshold)
        if self._input is not None and answer["model"] != self._input[0]:
            self._input = None  # the model was swapped: read its input size again
        detections = answer["detections"]
        if image is None:
            return JSONResponse({"detections": detections, "model": answer["model"], "image_size": [width, height]})
        from centernet_ray.drawing import detections_png

        labels = answer["labels"]  # the answering model's classes (another replica may hold another version)
        boxes = torch.tensor([d["bbox"] for d in detections], dtype=torch.float32).reshape(-1, 4)
        classes = [labels.index(d["label"]) for d in detections]
        png = await asyncio.to_thread(detections_png, image, boxes, classes, labels, [d["score"] for d in detections])
        return Response(png, media_type="image/png")

    def _internal_error(self, method: str, route: str) -> Response:
        """The answer to a request the endpoint failed (the model replica raised or is gone): the
        traceback to the log, a count, and JSON like every other error."""
        log.exception("%s %s failed", method, route)
        self.metrics.answered(route, 500, "internal_error")
        return JSONResponse({"error": "internal error: the endpoint's log has the traceback", "status": 500},
                            status_code=500)

    @api.get("/healthz")
    async def healthz(self) -> Response:
        try:
            metadata = await self.model.metadata.remote()
        except Exception as exc:  # whatever the replica raised, the endpoint cannot answer: a probe's 503
            # one line, not a traceback per probe: probes come every few seconds while it is down
            log.warning("GET /healthz: the model replica did not answer: %s: %s", type(exc).__name__,
                        (str(exc).splitlines() or [""])[0])
            return JSONResponse({"error": "unavailable: the model replica did not answer (the endpoint's log has "
                                          "why)", "status": 503}, status_code=503)
        return JSONResponse({"status": "ok", "model": metadata["model_version"]})

    @api.get("/metadata")
    async def metadata(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except RequestError as exc:
            self.metrics.answered("/metadata", exc.status, exc.kind)
            return _error(exc)
        try:
            metadata = await self.model.metadata.remote()
        except Exception:  # a fault of the endpoint, as in /detect
            return self._internal_error("GET", "/metadata")
        self.metrics.answered("/metadata", 200)
        return JSONResponse({**metadata, "max_body_bytes": self.settings.max_body_bytes,
                             "max_image_pixels": self.settings.max_image_pixels,
                             "default_score_threshold": self.settings.score_threshold,
                             "max_detections": self.settings.max_detections,
                             "api_key_required": self.keys.required})

    def _refusal(self, request: Request) -> Response | None:
        """The 401 for a request without a valid key (when keys are required), else None."""
        try:
            self._authorize(request)
        except RequestError as exc:
            return _error(exc)
        return None

    # The schema and its two viewers, behind the API key when keys are required. In a browser the
    # viewers work only on an open endpoint (a browser sends no key): use the schema with curl.
    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_schema(self, request: Request) -> Response:
        return self._refusal(request) or JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Response:
        return self._refusal(request) or get_swagger_ui_html(openapi_url=_schema_url(request),
                                                             title=f"{api.title} - docs")

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> Response:
        return self._refusal(request) or get_redoc_html(openapi_url=_schema_url(request), title=f"{api.title} - ReDoc")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for ``serve run``/``serve deploy`` and ``centernet-ray serve``.

    ``args``: ``checkpoint`` (path, URI or MLflow model URI; required), ``config`` (optional YAML
    whose ``serve`` section gives the defaults), any ``serve`` config key (``max_batch_size``,
    ``num_replicas``, ``num_gpus``, ``model_poll_s``, ...), ``flip_test``, ``tracking_uri`` and
    ``api_keys_required`` (the ingress refuses to start without keys)."""
    from centernet_ray.config import load_config

    args = dict(args)
    source = args.pop("checkpoint", None)
    if not source:
        raise UserInputError("the Serve application needs args.checkpoint: a checkpoint path/URI or models:/name@alias")
    base = load_config(args.pop("config")).serve if args.get("config") else ServeConfig()
    flip_test = bool(args.pop("flip_test", False))
    tracking_uri = args.pop("tracking_uri", None)
    keys_required = bool(args.pop("api_keys_required", False))
    settings = config_from_dict({"serve": {**dataclasses.asdict(base), **args}}).serve
    rollout = {**SHUTDOWN_OPTIONS, "max_surge_percent": settings.max_surge_percent}
    model_options: dict[str, Any] = {
        **rollout,
        "ray_actor_options": {"num_gpus": settings.num_gpus, "num_cpus": 1},
        # Eight batches deep: requests wait in the replica's batch queue, not in the router, whose
        # back-off cut 64 clients to 12 req/s at a depth of 16 (66 req/s at 64; BENCHMARKS.md)
        "max_ongoing_requests": max(8 * settings.max_batch_size, 64),
        "user_config": {"checkpoint": source},  # loaded by reconfigure()
    }
    if settings.max_replicas and settings.max_replicas > settings.num_replicas:
        model_options["autoscaling_config"] = {"min_replicas": settings.num_replicas,
                                               "max_replicas": settings.max_replicas,
                                               "target_ongoing_requests": settings.target_ongoing_requests}
    else:
        model_options["num_replicas"] = settings.num_replicas
    model = DetectionModel.options(**model_options).bind(flip_test, settings.max_batch_size,
                                                          settings.batch_wait_timeout_s, tracking_uri,
                                                          settings.model_poll_s, settings.amp)
    return DetectionAPI.options(max_ongoing_requests=settings.ingress_max_ongoing_requests, **rollout).bind(
        model, settings, keys_required)
