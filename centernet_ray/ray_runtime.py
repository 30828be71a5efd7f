"""Connecting to Ray (an existing cluster when one is given, else a local Ray sized for the machine),
with SIGTERM stopping a command's run as Ctrl+C does, across ``ray.init``'s own handler; and what a
command checks of that Ray before its work: the resources and node labels it asks for, and where
its processes read and write."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import ray
import ray.data

from centernet_ray.console import is_terminal
from centernet_ray.errors import UserInputError
from centernet_ray.ray_compat import SINGLE_NODE_TRAIN_ENV
from centernet_ray.storage import is_node_local_store, is_uri
from centernet_ray.tracking import running_as_ray_job

log = logging.getLogger(__name__)

_local_ray_started_here = False  # whether init_ray started the local Ray this process is connected to


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (or the one running this Ray job); otherwise start
    a local Ray with more logical CPUs than cores, so that Ray Data's CPU stages are not starved by
    train workers on small machines (a 2-core box with num_cpus=2 deadlocks)."""
    if ray.is_initialized():
        return
    if not is_terminal():
        # Ray Data's workers then log their progress as lines (LoggingExecutionProgressManager)
        # instead of sending tqdm bars that the driver redraws with cursor movements.
        ray.data.DataContext.get_current().use_ray_tqdm = False
    if joins_a_cluster():
        _init_keeping_sigterm_handler(log_to_driver=True)
        log.info("connected to Ray cluster: %s", ray.cluster_resources())
        return
    cpus = num_cpus or max(8, os.cpu_count() or 1)
    use_single_node_train_env()
    # The dashboard (on 127.0.0.1 only) serves Ray's State API, which Ray Train's PlacementGroupCleaner
    # needs: without it the placement group of a Train run whose driver was killed (a trial stopped
    # by ASHA) is never removed, and its CPUs stay reserved until Ray stops.
    # address="local": a new local Ray even when another one runs on this machine (`ray start`, a
    # second command), which ray.init() without an address would join instead.
    _init_keeping_sigterm_handler(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    global _local_ray_started_here
    _local_ray_started_here = True
    log.info("started local Ray with %d logical CPUs on %d cores", cpus, os.cpu_count() or 1)


def _init_keeping_sigterm_handler(**kwargs: Any) -> None:
    """``ray.init(**kwargs)``, keeping the SIGTERM handler this process had set: ``ray.init`` sets
    its own (``sys.exit``; its core worker also sets a C handler, after which the process aborts at
    exit), where the CLI's stops a run or sweep as Ctrl+C does (``sigterm_as_ctrl_c``)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    ray.init(**kwargs)
    if callable(handler):
        signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (``ray job stop``, Kubernetes stopping a pod, ``kill``) stops the block as Ctrl+C
    does: a run or sweep then stops resumably, its MLflow run marked and its folder's lease
    removed, where SIGTERM's default (or ``ray.init``'s ``sys.exit``) would end the process on the
    spot. Only in the main thread, where Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def as_ctrl_c(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIGINT ignored (a background job of a script) or Python's default left
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    previous = signal.signal(signal.SIGTERM, as_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_local_ray() -> None:
    """Stop the local Ray that :func:`init_ray` started in this process; a cluster it joined (or a
    Ray started by someone else in this process) is left running. The log lines of Ray's processes
    reach this terminal through Ray's log monitor, a moment late: stopping it before the command
    prints its result keeps them above the result instead of after it."""
    global _local_ray_started_here
    if _local_ray_started_here and ray.is_initialized():
        ray.shutdown()
    _local_ray_started_here = False


def joins_a_cluster() -> bool:
    """Whether this process works on a Ray started elsewhere, which other users' work may share and an
    autoscaler may grow: :func:`init_ray` joins one (``RAY_ADDRESS``, or a Ray job's driver), or this
    is one of Ray's actors (a Tune trial's driver), not the command that started its Ray."""
    if os.environ.get("RAY_ADDRESS") or running_as_ray_job():
        return True
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def use_single_node_train_env() -> None:
    """Ray Train's settings for a Ray of one machine (``ray_compat.SINGLE_NODE_TRAIN_ENV``), unless
    set: call before starting that Ray, whose processes inherit them."""
    for name, value in SINGLE_NODE_TRAIN_ENV.items():
        os.environ.setdefault(name, value)


def refuse_or_warn_missing(path: str, message: str) -> None:
    """A file that Ray's processes will read at ``path`` is missing here: a ``UserInputError`` saying
    ``message`` when they would miss it too (a URI is the same everywhere; a Ray this command
    started is this machine), else, on a cluster joined, whose nodes may hold it at that path, a
    warning."""
    if is_uri(path) or not joins_a_cluster():
        raise UserInputError(message)
    log.warning("%s", message)


def check_resources(need: dict[str, float], what: str, fix: Callable[[str, float], str]) -> None:
    """Refuse ``need`` (Ray resources in all, e.g. ``{"GPU": 2.0}``) where this command's own Ray has
    less: Ray would wait for them for ever (Ray Train retries its workers' start every minute, Serve
    keeps a replica pending). On a cluster joined, whose autoscaler may start such nodes, warn.
    ``what`` names who asks (plural verb); ``fix(resource, amount the Ray has)`` says what setting
    asks for less. An amount of 0 asks for nothing."""
    if not ray.is_initialized():
        return
    total = ray.cluster_resources()
    short = [name for name, amount in need.items() if amount > total.get(name, 0.0)]
    if not short:
        return
    asked = " and ".join(counted(need[name], name) for name in short)
    has = " and ".join(counted(total.get(name, 0.0), name) for name in short)
    fixes = "; ".join(fix(name, total.get(name, 0.0)) for name in short)
    if joins_a_cluster():
        log.warning("%s need %s, but this cluster has %s now: they wait until nodes with them join (an autoscaler "
                    "starts them), or %s", what, asked, has, fixes)
        return
    raise UserInputError(f"{what} need {asked}, but the Ray this command started has {has}: {fixes}; or run on a "
                         "cluster that has them (RAY_ADDRESS, or `ray job submit`)")


def counted(amount: float, noun: str) -> str:
    """``2 GPUs``, ``1 GPU``, ``0.5 GPUs``, ``1 training worker``."""
    return f"{amount:g} {noun}" + ("" if amount == 1 else "s")


def _alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive")) if ray.is_initialized() else 1


def warn_if_node_local(path: str, what: str) -> None:
    """Log a warning when ``path`` is a plain local path but the cluster has several nodes: each node
    would read and write its own disk unless the path is a mount they all share (NFS)."""
    if is_uri(path):
        return
    nodes = _alive_nodes()
    if nodes > 1:
        log.warning("%s %s is a local path on a %d-node cluster: use an object store URI (s3://, gs://) "
                    "or a mount every node shares", what, path, nodes)


def job_working_dir() -> Path | None:
    """The folder this process runs in when it is a Ray job's entrypoint started in the job's
    working_dir: the copy Ray unpacks under its session's ``runtime_resources`` and deletes with it
    (or sooner, once no job uses it). None otherwise."""
    if not running_as_ray_job():
        return None
    folder = Path.cwd()
    return folder if "runtime_resources" in folder.parts else None


def warn_if_in_job_working_dir(path: str, what: str, fix: str) -> None:
    """Log a warning when ``path`` (absolute, or a URI naming it such as ``sqlite:////...``) is inside
    this Ray job's working_dir (:func:`job_working_dir`): what is written there is lost with it.
    ``what`` names the setting, ``fix`` says what to set instead."""
    folder = job_working_dir()
    if folder is not None and str(folder) in str(path):
        log.warning("%s %s is inside this Ray job's working_dir, a copy Ray deletes with its session: %s",
                    what, path, fix)


def warn_if_storage_in_job_working_dir(path: str, what: str = "train.storage_path") -> None:
    """:func:`warn_if_in_job_working_dir` for where a run or sweep keeps its checkpoints and state."""
    warn_if_in_job_working_dir(path, what, "set train.storage_path (or CENTERNET_RAY_STORAGE in the job's "
                               "runtime_env) to a bucket URI or a lasting path")


def warn_if_node_local_tracking(uri: str) -> None:
    """Log a warning when the MLflow store ``uri`` is a SQLite file or a folder but the cluster has
    several nodes: rank 0 of a training run, each Tune trial and each Serve replica may run on
    another node and would write to (or read from) that node's own copy."""
    if not is_node_local_store(uri):
        return
    warn_if_in_job_working_dir(uri, "the MLflow store", "set tracking.tracking_uri (or MLFLOW_TRACKING_URI in the "
                               "job's runtime_env) to a tracking server or a lasting path")
    nodes = _alive_nodes()
    if nodes > 1:
        log.warning("the MLflow store %s is on one node's disk, but this cluster has %d nodes: runs would land "
                    "on whichever node logs them. Run a tracking server (`mlflow server ...`) and set "
                    "tracking.tracking_uri (or $MLFLOW_TRACKING_URI) to its http:// address, or use a path "
                    "every node mounts", uri, nodes)


def check_node_labels(selector: dict[str, str] | None, what: str,
                      fix: str = "set cluster.node_pools=false to run anywhere") -> None:
    """Refuse ``selector`` (``cluster.node_pools``' label) where no node of the Ray this command
    started carries it: ``what`` would wait for such a node for ever. On a cluster joined, whose
    autoscaler may start one, warn. ``fix`` says how to ask for no label."""
    if not selector or not ray.is_initialized():
        return
    nodes = [node.get("Labels") or {} for node in ray.nodes() if node.get("Alive")]
    if any(all(node.get(key) == value for key, value in selector.items()) for node in nodes):
        return
    label = ", ".join(f"{key}={value}" for key, value in selector.items())
    if joins_a_cluster():
        log.warning("no node of this cluster has the label %s that %s need (cluster.node_pools): they wait until "
                    "one joins; %s", label, what, fix)
        return
    raise UserInputError(f"no node of the Ray this command started has the label {label} that {what} need "
                         f"(cluster.node_pools): {fix}; or run on a cluster whose nodes carry it (RAY_ADDRESS, "
                         "or `ray job submit`)")
