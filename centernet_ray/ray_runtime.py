"""Connecting to Ray: an existing cluster when one is given, else a local Ray sized for the machine."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (or the one running this Ray job); otherwise start
    a local Ray with more logical CPUs than cores, so that Ray Data's CPU stages are not starved by
    train workers on small machines (a 2-core box with num_cpus=2 deadlocks)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(log_to_driver=True)
        log.info("connected to Ray cluster: %s", ray.cluster_resources())
        return
    cpus = num_cpus or max(8, os.cpu_count() or 1)
    # The dashboard (on 127.0.0.1 only) serves Ray's State API, which Ray Train's PlacementGroupCleaner
    # needs: without it the placement group of a Train run whose driver was killed (a trial stopped
    # by ASHA) is never removed, and its CPUs stay reserved until Ray stops.
    ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    log.info("started local Ray with %d logical CPUs on %d cores", cpus, os.cpu_count() or 1)


def warn_if_node_local(path: str, what: str) -> None:
    """Log a warning when ``path`` is a plain local path but the cluster has several nodes: each node
    would read and write its own disk unless the path is a mount they all share (NFS)."""
    if "://" in str(path) or not ray.is_initialized():
        return
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1:
        log.warning("%s %s is a local path on a %d-node cluster: use an object store URI (s3://, gs://) "
                    "or a mount every node shares", what, path, nodes)
