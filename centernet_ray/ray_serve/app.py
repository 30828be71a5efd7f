"""The Serve application: a FastAPI ingress composed with a batched model deployment.

``DetectionAPI`` (ingress, CPU) checks and decodes each request; ``DetectionModel`` gathers
requests with ``@serve.batch`` and runs letterboxing, the network and ``decode`` (3x3 max-pool
peaks + top-K, no NMS) for the whole batch on its device. ``build_app`` is the import path for
``serve run`` / ``serve deploy`` (see cluster/serve.yaml) and for ``centernet-ray serve``.
"""


import asyncio
import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from centernet_ray.config import ServeConfig, config_from_dict
from centernet_ray.errors import UserInputError
from centernet_ray.ray_serve.requests import RequestError, decode_request_image, image_bytes, parse_params

log = logging.getLogger(__name__)

api = FastAPI(title="centernet-ray", description="CenterNet object detection")


@serve.deployment(name="DetectionModel")
class DetectionModel:
    """One model replica: batches of decoded images in, detections (original pixels) out."""

    def __init__(self, source: str, flip_test: bool = False, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, tracking_uri: str | None = None) -> None:
        from centernet_ray.checkpoint import load_served_model
        from centernet_ray.detector import Detector

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        served = load_served_model(source, device, tracking_uri)
        self.loaded, self.version, self.source = served.loaded, served.version, served.source
        self.detector = Detector(served.loaded.model, served.loaded.config.data.input_size, device, flip_test,
                                 amp="bf16" if device.type == "cuda" else "none")
        self.max_batch_size = max_batch_size
        self.detect_batch.set_max_batch_size(max_batch_size)
        self.detect_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("DetectionModel %s on %s, batches of up to %d", self.version, device, max_batch_size)

    def metadata(self) -> dict[str, Any]:
        height, width = self.detector.input_size
        return {"model_version": self.version, "checkpoint_source": self.source,
                "classes": [{"category_id": c, "label": n}
                            for c, n in zip(self.loaded.category_ids, self.loaded.class_names)],
                "input_size": {"height": height, "width": width}, "epoch": self.loaded.epoch,
                "device": str(self.detector.device), "flip_test": self.detector.flip_test,
                "max_batch_size": self.max_batch_size}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def detect_batch(self, images: list[np.ndarray], max_detections: list[int],
                           thresholds: list[float]) -> list[list[dict[str, Any]]]:
        """images: uint8 [3, H, W] each (any sizes); one list of detections per image."""
        found = self.detector.detect_images([torch.from_numpy(image) for image in images], k=max(max_detections),
                                            score_threshold=0.0)
        answers = []
        for det, limit, threshold in zip(found, max_detections, thresholds):
            keep = np.flatnonzero(det.scores > threshold)[:limit]  # scores come sorted, highest first
            answers.append([{"bbox": [float(v) for v in det.boxes[i]], "score": float(det.scores[i]),
                             "category_id": int(self.loaded.category_ids[det.classes[i]]),
                             "label": self.loaded.class_names[det.classes[i]]} for i in keep])
        return answers

    async def __call__(self, image: np.ndarray, max_detections: int, threshold: float) -> list[dict[str, Any]]:
        return await self.detect_batch(image, max_detections, threshold)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


@serve.deployment(name="DetectionAPI")
@serve.ingress(api)
class DetectionAPI:
    """HTTP front: validates and decodes requests (never a 5xx for a client error)."""

    def __init__(self, model: DeploymentHandle, settings: ServeConfig) -> None:
        self.model = model
        self.settings = settings
        self._metadata: dict[str, Any] | None = None

    async def _model_metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            self._metadata = await self.model.metadata.remote()
        return self._metadata

    @api.post("/detect")
    async def detect(self, request: Request) -> Response:
        settings = self.settings
        try:
            params = parse_params(request.query_params, settings.score_threshold, settings.max_detections)
            data = await image_bytes(request, settings.max_body_bytes)
            image = await asyncio.to_thread(decode_request_image, data, settings.max_image_pixels)
        except RequestError as exc:
            return _error(exc.status, exc.message)
        detections = await self.model.remote(image.numpy(), params.max_detections, params.score_threshold)
        metadata = await self._model_metadata()
        if params.format == "png":
            from centernet_ray.drawing import detections_png

            labels = [c["label"] for c in metadata["classes"]]
            boxes = torch.tensor([d["bbox"] for d in detections], dtype=torch.float32).reshape(-1, 4)
            classes = [labels.index(d["label"]) for d in detections]
            png = await asyncio.to_thread(detections_png, image, boxes, classes, labels, [d["score"] for d in detections])
            return Response(png, media_type="image/png")
        return JSONResponse({"detections": detections, "model": metadata["model_version"],
                             "image_size": [int(image.shape[2]), int(image.shape[1])]})

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        metadata = await self._model_metadata()
        return {"status": "ok", "model": metadata["model_version"]}

    @api.get("/metadata")
    async def metadata(self) -> dict[str, Any]:
        return {**await self._model_metadata(), "max_body_bytes": self.settings.max_body_bytes,
                "max_image_pixels": self.settings.max_image_pixels,
                "default_score_threshold": self.settings.score_threshold,
                "max_detections": self.settings.max_detections}


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for ``serve run``/``serve deploy`` and ``centernet-ray serve``.

    ``args``: ``checkpoint`` (path, URI or MLflow model URI; required), ``config`` (optional YAML
    whose ``serve`` section gives the defaults), any ``serve`` config key (``max_batch_size``,
    ``num_replicas``, ``num_gpus``, ...), ``flip_test`` and ``tracking_uri``."""
    from centernet_ray.config import load_config

    args = dict(args)
    source = args.pop("checkpoint", None)
    if not source:
        raise UserInputError("the Serve application needs args.checkpoint: a checkpoint path/URI or models:/name@alias")
    base = load_config(args.pop("config")).serve if args.get("config") else ServeConfig()
    flip_test = bool(args.pop("flip_test", False))
    tracking_uri = args.pop("tracking_uri", None)
    settings = config_from_dict({"serve": {**dataclasses.asdict(base), **args}}).serve
    model_options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": settings.num_gpus, "num_cpus": 1},
        "max_ongoing_requests": max(2 * settings.max_batch_size, 8),
    }
    if settings.max_replicas and settings.max_replicas > settings.num_replicas:
        model_options["autoscaling_config"] = {"min_replicas": settings.num_replicas,
                                               "max_replicas": settings.max_replicas,
                                               "target_ongoing_requests": settings.target_ongoing_requests}
    else:
        model_options["num_replicas"] = settings.num_replicas
    model = DetectionModel.options(**model_options).bind(source, flip_test, settings.max_batch_size,
                                                          settings.batch_wait_timeout_s, tracking_uri)
    return DetectionAPI.options(max_ongoing_requests=max(4 * settings.max_batch_size, 32)).bind(model, settings)

