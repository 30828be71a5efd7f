"""``centernet-ray serve``: start Serve's HTTP proxy on the configured address and run the app."""

from __future__ import annotations

import dataclasses
import logging
import time

from centernet_ray.checkpoint import is_mlflow_uri
from centernet_ray.config import Config
from centernet_ray.ray_runtime import warn_if_node_local_tracking
from centernet_ray.tracking import tracking_uri

log = logging.getLogger(__name__)

APP_NAME = "centernet"


def start_app(config: Config, checkpoint: str, flip_test: bool = False) -> str:
    """Deploy the application on the running Ray; returns its base URL."""
    from ray import serve

    from centernet_ray.ray_serve.app import build_app

    settings = config.serve
    if is_mlflow_uri(checkpoint):
        warn_if_node_local_tracking(tracking_uri(config))
    serve.start(http_options={"host": settings.host, "port": settings.port})
    args = {**dataclasses.asdict(settings), "checkpoint": checkpoint, "flip_test": flip_test,
            "tracking_uri": tracking_uri(config)}
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"


def serve_forever(config: Config, checkpoint: str, flip_test: bool = False) -> None:
    from ray import serve

    url = start_app(config, checkpoint, flip_test)
    log.info("serving %s at %s/detect (also /healthz, /metadata); Ctrl+C stops", checkpoint, url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("shutting down Serve")
        serve.shutdown()
