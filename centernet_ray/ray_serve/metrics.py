"""The endpoint's application metrics, through Ray Serve's metrics API (``ray.serve.metrics``).

Ray exports them with its own on each node's Prometheus endpoint (``ray_`` prefixed), beside Serve's
per-deployment request counts and latencies: requests by route and status, errors by kind (the
client's 4xx kinds, and ``internal_error`` for a 500), request latency at the ingress; batch sizes,
model latency, detections per image and model swaps at the replicas.
"""

from __future__ import annotations

from ray.serve import metrics

LATENCY_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = metrics.Counter("centernet_requests", description="HTTP requests by route and status",
                                        tag_keys=("route", "status"))
        self.errors = metrics.Counter("centernet_request_errors",
                                      description="errors by kind: 4xx kinds, internal_error", tag_keys=("kind",))
        self.latency_ms = metrics.Histogram("centernet_request_latency_ms", description="/detect latency at the ingress",
                                            boundaries=LATENCY_MS_BOUNDARIES)

    def answered(self, route: str, status: int, kind: str | None = None) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        if kind:
            self.errors.inc(tags={"kind": kind})


class ModelMetrics:
    def __init__(self) -> None:
        self.batch_size = metrics.Histogram("centernet_batch_size", description="images per model batch",
                                            boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.latency_ms = metrics.Histogram("centernet_model_latency_ms", description="model + decode time per batch",
                                            boundaries=LATENCY_MS_BOUNDARIES)
        self.detections = metrics.Histogram("centernet_detections", description="detections returned per image",
                                            boundaries=[0.5, 1.5, 2.5, 5.5, 10.5, 20.5, 50.5, 100.5])  # buckets 0, 1, 2, 3-5, ... (Ray needs boundaries > 0)
        self.swaps = metrics.Counter("centernet_model_swaps", description="models swapped in place (moved aliases)")
