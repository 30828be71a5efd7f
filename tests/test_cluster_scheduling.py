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


@pytest.fixture(scope="module")
def node_pool_cluster(free_ports):
    """One simulated cluster for the module (its start is ~6 s of the machine): each test's State API
    assertions hold whatever the other one ran there, every data task of both being on the CPU node."""
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


def _noise_coco(root: Path, count: int, distinct: int = 8) -> tuple[Path, Path]:
    """``count`` 256x256 JPEGs of noise (~0.1 MB each: they do not compress), hard links to
    ``distinct`` files, with one box each: a dataset whose image bytes are large next to its
    annotations."""
    import io

    import numpy as np
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(distinct):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
        (root / f"source-{k}.jpg").write_bytes(buffer.getvalue())
    entries, boxes = [], []
    for i in range(count):
        os.link(root / f"source-{i % distinct}.jpg", images / f"{i:05d}.jpg")
        entries.append({"id": i + 1, "file_name": f"{i:05d}.jpg", "width": 256, "height": 256})
        boxes.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 20, 100, 50], "area": 5000,
                      "iscrowd": 0})
    annotations = root / "instances.json"
    annotations.write_text(json.dumps({"images": entries, "annotations": boxes,
                                       "categories": [{"id": 1, "name": "noise"}]}))
    return images, annotations


def _ingest_on_the_cluster(cluster, images: Path, annotations: Path, out: Path) -> int:
    """`centernet-ray data ingest --node-pools` joined to the cluster; returns its peak RSS in bytes."""
    script = ("import resource, sys\nfrom centernet_ray.cli import main\ncode = main(sys.argv[1:])\n"
              "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)")
    finished = subprocess.run([sys.executable, "-c", script, "data", "ingest", "--images", str(images),
                               "--annotations", str(annotations), "--out", str(out), "--shard-size", "2000",
                               "--node-pools"], env={**os.environ, "RAY_ADDRESS": cluster.address},
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return int(finished.stdout.split("PEAK_RSS_KB")[1].split()[0]) * 1024


def test_ingest_reads_images_in_tasks_on_the_cpu_pool_and_the_driver_holds_no_image_bytes(
        node_pool_cluster, tmp_path):
    import pyarrow.parquet as pq
    from ray.util.state import list_tasks

    from centernet_ray.ray_data.ingest import ingest_coco, read_manifest

    cluster, node_ids, dashboard = node_pool_cluster
    small, large = _noise_coco(tmp_path / "small", 500), _noise_coco(tmp_path / "large", 4000)
    peak_small = _ingest_on_the_cluster(cluster, *small, tmp_path / "small-pq")
    peak_large = _ingest_on_the_cluster(cluster, *large, tmp_path / "large-pq")
    # 3,500 more images of 0.1 MB: 350 MB more bytes read, 2,000 per shard; none of them in the driver
    assert peak_large - peak_small < 100e6, (peak_small, peak_large)

    tasks = [t for t in list_tasks(address=dashboard, limit=10_000, raise_on_missing_output=False, detail=True)
             if "_write_shards_task" in t.name]
    assert len(tasks) >= 3 and {t.node_id for t in tasks} == {node_ids["cpu"]}, [(t.name, t.node_id) for t in tasks]

    # the same output as ingesting in one process, without Ray: rows, counts, manifest
    reference = ingest_coco(str(small[0]), str(small[1]), str(tmp_path / "reference"), shard_size=2000, use_ray=False)
    assert read_manifest(str(tmp_path / "small-pq")) == read_manifest(str(tmp_path / "reference"))
    assert reference.rows == 500 and reference.shards == ["part-00000.parquet"]
    assert pq.read_table(tmp_path / "small-pq").equals(pq.read_table(tmp_path / "reference"))
