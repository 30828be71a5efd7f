"""``centernet-ray serve``: start Serve's HTTP proxy on the configured address, run the app, and
shut it down cleanly on SIGTERM (what Kubernetes sends) or SIGINT (Ctrl+C)."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import math
import signal
import socket
import threading

from centernet_ray import ray_runtime, storage
from centernet_ray.checkpoint import check_model_source, is_mlflow_uri
from centernet_ray.config import Config, ServeConfig
from centernet_ray.errors import UserInputError, error_message, user_error_text
from centernet_ray.ray_runtime import (check_resources, counted, joins_a_cluster, refuse_or_warn_missing,
                                      warn_if_node_local_tracking)
from centernet_ray.ray_serve.auth import ApiKeys
from centernet_ray.tracking import tracking_uri

log = logging.getLogger(__name__)

APP_NAME = "centernet"


def start_app(config: Config, checkpoint: str, flip_test: bool = False) -> str:
    """Deploy the application, joining or starting Ray (``init_ray``) once what needs no Ray is
    checked (the keys file, the checkpoint); returns its base URL."""
    from ray import serve

    from centernet_ray.ray_serve.app import build_app

    settings = config.serve
    if settings.api_keys_file:  # replicas run in Ray's session folder: name the file from here
        settings = dataclasses.replace(settings, api_keys_file=storage.absolute(settings.api_keys_file))
    if not is_mlflow_uri(checkpoint):  # replicas run in Ray's session folder: name the file from here
        checkpoint = storage.absolute(checkpoint)
    keys_required = ApiKeys.load(settings.api_keys_file).required  # a bad keys file fails here, in one line
    check_source(checkpoint, tracking_uri(config))
    ray_runtime.init_ray()
    if is_mlflow_uri(checkpoint):  # counts the cluster's nodes: after Ray is joined
        warn_if_node_local_tracking(tracking_uri(config))
    check_replicas_fit(settings)
    if not joins_a_cluster() and not serve.status().proxies:  # Serve's proxy will bind here, on this machine
        check_port_free(settings.host, settings.port)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    args = {**dataclasses.asdict(settings), "checkpoint": checkpoint, "flip_test": flip_test,
            "tracking_uri": tracking_uri(config), "api_keys_required": keys_required}
    was_running = APP_NAME in serve.status().applications  # a cluster's app this deploy updates
    try:
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as exc:  # Serve's "Deploying application centernet failed": a replica could not start
        raise _deploy_failure(exc, delete=joins_a_cluster() and not was_running) from exc
    return f"http://{settings.host}:{settings.port}"


def check_source(checkpoint: str, store: str) -> None:
    """``check_model_source`` before Serve starts (a replica would fail on it, three times, after a
    ~15 s start); a path missing here only warns on a cluster joined, whose nodes may have it."""
    try:
        check_model_source(checkpoint, store)
    except FileNotFoundError as exc:
        refuse_or_warn_missing(checkpoint, f"{exc} here (the replicas read it on their nodes)")


def check_port_free(host: str, port: int) -> None:
    """Refuse ``host:port`` where Serve's HTTP proxy could not listen: a port another program holds, a
    host that is not this machine's. The proxy would fail on it after Serve's start, in a traceback
    and the controller's retries. The probe is the proxy's socket (IPv6 for an IPv6 address, else
    IPv4; ``SO_REUSEADDR``, so a port whose last connections are closing is free) without the
    proxy's ``SO_REUSEPORT``, so that a port another Serve holds is refused too, not shared with it."""
    where = f"cannot serve on {host}:{port}"
    with socket.socket(socket.AF_INET6 if _is_ipv6_address(host) else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror as exc:
            raise UserInputError(f"{where}: {exc.strerror}: give --host (serve.host) an address or name of this "
                                 "machine (0.0.0.0 for all of its addresses)") from None
        except OSError as exc:
            fix = {errno.EADDRINUSE: "another program listens there: give another --port (serve.port), or stop it",
                   errno.EACCES: "ports below 1024 need privileges: give a port above 1023 (--port, serve.port)",
                   errno.EADDRNOTAVAIL: "no address of this machine: give --host (serve.host) one of its addresses "
                                        "(0.0.0.0 for all)"}.get(exc.errno, "give another --host or --port")
            raise UserInputError(f"{where}: {exc.strerror}: {fix}") from None


def _is_ipv6_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:  # a name: the proxy binds it as IPv4
        return False


def check_replicas_fit(settings: ServeConfig) -> None:
    """The model replicas' resources (one CPU and ``serve.num_gpus`` each, one CPU for the ingress)
    refused where the Ray this command started has fewer: Serve would keep the replicas pending for
    ever. Ray packs a fraction of a GPU within one GPU: replicas of 0.6 take one GPU each."""
    replicas, gpus = settings.num_replicas, settings.num_gpus
    per_gpu = math.floor(1 / gpus) if 0 < gpus < 1 else 0
    need = {"CPU": replicas + 1.0, "GPU": math.ceil(replicas / per_gpu) if per_gpu else replicas * gpus}
    check_resources(need, f"{counted(replicas, 'model replica')} (serve.num_replicas={replicas}, "
                          f"serve.num_gpus={gpus:g}) and the ingress", _fewer_replicas)


def _fewer_replicas(resource: str, _has: float) -> str:
    if resource == "GPU":
        return "set serve.num_gpus=0 (--num-gpus 0) to serve on the CPU"
    return "lower serve.num_replicas (--replicas)"


def _deploy_failure(exc: RuntimeError, delete: bool) -> Exception:
    """What to raise when the application failed to deploy: the error of the replica that could not
    start, which Serve keeps in the deployment's status, not in its own exception (a
    ``UserInputError`` when it was one: a checkpoint that is no checkpoint, a file missing on the
    replica's node). ``delete``: the application this command created on a cluster is deleted, not
    left retrying there; one it updated keeps the replicas Serve kept through the failed update."""
    from ray import serve
    from ray.serve.schema import DeploymentStatus

    applications = serve.status().applications
    deployments = applications[APP_NAME].deployments if APP_NAME in applications else {}
    failing = (DeploymentStatus.DEPLOY_FAILED, DeploymentStatus.UNHEALTHY)
    model_first = sorted(deployments.items(), key=lambda item: item[0] != "DetectionModel")
    failed = [deployment.message for _, deployment in model_first if deployment.message and deployment.status in failing]
    if delete:
        serve.delete(APP_NAME)
    if not failed:
        return exc
    line = error_message(failed[0])
    user_error = user_error_text(line)
    if user_error is not None:
        return UserInputError(f"the model replica could not start: {user_error}")
    return RuntimeError(f"{exc} The model replica's error: {line}")


def metrics_url() -> str | None:
    """This node's Prometheus endpoint (Ray's metrics, the endpoint's own included)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


def serve_forever(config: Config, checkpoint: str, flip_test: bool = False) -> str:
    """Serve until SIGTERM or SIGINT, then stop; returns the signal's name. On a Ray of its own the
    whole of Serve is shut down; on a cluster it joined only this application is deleted (other
    applications, and Serve's controller and proxies, stay)."""
    from ray import serve

    received: list[str] = []
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        url = start_app(config, checkpoint, flip_test)
        log.info("serving %s at %s/detect (also /healthz, /metadata); Ctrl+C or SIGTERM stops", checkpoint, url)
        log.info("metrics (Prometheus): %s", metrics_url() or "not exported by this Ray")
        while not stop.wait(1.0):  # a timed wait: signal handlers run between waits
            pass
        if joins_a_cluster():
            log.info("received %s: deleting the application %r (Serve keeps running on the cluster)", received[0],
                     APP_NAME)
            serve.delete(APP_NAME)
        else:
            log.info("received %s: shutting down Serve", received[0])
            serve.shutdown()
        log.info("Serve stopped")
        return received[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
