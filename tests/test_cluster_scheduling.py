"""Node pools on a simulated multi-node Ray: a head that runs no work, a node labelled as the CPU
pool and one labelled as the GPU pool (three raylets on this machine, `ray.cluster_utils.Cluster`).
`centernet-ray train` joins it through RAY_ADDRESS like a `ray job submit` entrypoint would, and
Ray's own task and actor records (the State API) must show every data task and actor on the CPU
node and every train worker on the GPU node."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

POOL_LABEL = "centernet-ray/pool"
TINY_TRAIN = Path(__file__).parent / "tiny_train.yaml"


@pytest.fixture
def node_pool_cluster(free_ports):
    from ray.cluster_utils import Cluster

    dashboard_port, = free_ports(1)
    # Ray's gRPC services use the machine's address (it maps 127.0.0.1 to it for drivers anyway);
    # the only HTTP, the State API on the dashboard, stays on 127.0.0.1.
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port})
    nodes = {"cpu": cluster.add_node(num_cpus=4, labels={POOL_LABEL: "cpu"}),
             "gpu": cluster.add_node(num_cpus=2, labels={POOL_LABEL: "gpu"})}
    try:
        yield cluster, {pool: node.node_id for pool, node in nodes.items()}, f"http://127.0.0.1:{dashboard_port}"
    finally:
        cluster.shutdown()


def test_preprocessing_runs_on_the_cpu_pool_and_train_workers_on_the_gpu_pool(
        node_pool_cluster, shapes_dataset, tmp_path):
    from ray.util.state import list_actors, list_tasks

    cluster, node_ids, dashboard = node_pool_cluster
    summary = tmp_path / "summary.json"
    command = [sys.executable, "-m", "centernet_ray", "train", str(TINY_TRAIN), "cluster.node_pools=true",
               "train.num_workers=2", "data.preprocess_max_actors=2", f"data.root={shapes_dataset}",
               f"data.parquet_dir={tmp_path / 'parquet'}", f"train.storage_path={tmp_path / 'runs'}",
               f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "--summary-json", str(summary)]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert json.loads(summary.read_text())["epochs"] == 1
    # A SQLite store on a 3-node cluster: the user is told, with the fix, before training starts.
    assert "the MLflow store sqlite:///" in finished.stderr and "3 nodes" in finished.stderr
    assert "Run a tracking server (`mlflow server ...`)" in finished.stderr

    actors = list_actors(address=dashboard, limit=10_000, raise_on_missing_output=False)
    tasks = list_tasks(address=dashboard, limit=10_000, raise_on_missing_output=False, detail=True)
    where = {node_ids["cpu"]: "cpu", node_ids["gpu"]: "gpu"}

    train_workers = [a for a in actors if a.class_name == "RayTrainWorker"]
    assert len(train_workers) == 2, sorted({a.class_name for a in actors})
    assert {where.get(a.node_id, "head") for a in train_workers} == {"gpu"}

    # Ray Data's preprocessing actors (MapWorker(MapBatches(RayPreprocessor))) and its tasks:
    # Parquet reads and every other task the datasets launched.
    data_actors = [a for a in actors if a.class_name.startswith("MapWorker(")]
    data_tasks = [t for t in tasks if t.type == "NORMAL_TASK" and
                  any(op in t.name for op in ("ReadParquet", "MapBatches", "Split", "Read"))]
    assert data_actors and any("RayPreprocessor" in a.class_name for a in data_actors)
    assert any("ReadParquet" in t.name for t in data_tasks), sorted({t.name for t in tasks})
    # An actor the autoscaling pool requested but shut down before it was placed has no node: it ran nothing.
    placed = [r for r in data_actors + data_tasks if r.node_id is not None]
    assert all(r.state == "DEAD" for r in data_actors if r.node_id is None)
    misplaced = [(getattr(r, "class_name", None) or r.name, where.get(r.node_id, "head"))
                 for r in placed if where.get(r.node_id) != "cpu"]
    assert not misplaced, misplaced
    assert any(r.node_id == node_ids["cpu"] for r in data_actors)
