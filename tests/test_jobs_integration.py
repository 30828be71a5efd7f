"""`ray job submit` of the train job to a real three-node Ray started with `ray start` (a head that
runs no work, a node labelled as the CPU pool, one labelled as the GPU pool: three raylets on this
machine) with token authentication (DESIGN.md: the Jobs API of Ray 2.60 needs RAY_AUTH_MODE=token
and RAY_AUTH_TOKEN on every node and on the client), tracked on a real `mlflow server`: the path users
take from submitting a job to a cluster of CPU and GPU nodes to reading it in MLflow. With
`cluster.node_pools=true`, Ray's own task and actor records (the State API) must show every data
task and preprocessing actor on the CPU node and every train worker on the GPU node."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # ray, and the `python` the job's entrypoint runs
TINY_CONFIG = "tests/tiny_train.yaml"  # relative: the job runs in the uploaded copy of the repo
POOL_LABEL = "centernet-ray/pool"


def _http(address: str, path: str, token: str | None, method: str = "GET", body: bytes | None = None) -> int:
    """The HTTP status of one request to the Jobs API (0: no connection)."""
    request = urllib.request.Request(address + path, data=body, method=method,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:  # URLError (connection refused while Ray starts), timeouts
        return 0


def _ray_start(background_services, log: Path, env: dict[str, str], ports, *args) -> "subprocess.Popen":
    """`ray start --block ARGS` with ports of its own for every service of a node (three nodes share
    this machine; ``ports``: an iterator of free ones), its output in ``log``."""
    agent_http, agent_grpc, metrics, node_manager, object_manager, runtime_env = (next(ports) for _ in range(6))
    return background_services.start([
        VENV_BIN / "ray", "start", "--block", *args, f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        f"--runtime-env-agent-port={runtime_env}",
        "--min-worker-port=0", "--max-worker-port=0",  # workers: ports chosen by the OS
        "--object-store-memory=300000000", "--disable-usage-stats",
    ], log, **env)


@pytest.fixture(scope="module")
def ray_cluster(background_services, free_ports, tmp_path_factory):
    """A real `ray start --head` (0 CPUs: it runs the job's driver and Ray's own actors, no work) with
    its own free ports, temp dir and a throw-away token (the format of `ray get-auth-token
    --generate`), its Jobs API up on 127.0.0.1; two `ray start --address` nodes labelled through
    RAY_OVERRIDE_LABELS, as the cluster launcher labels them (cluster/aws.yaml): the CPU pool (4
    CPUs) and the GPU pool (2 CPUs, no GPU here). Stopped by ``background_services``: only this
    cluster's processes, never a bare `ray stop`."""
    token = secrets.token_hex(32)
    # all at once: ports picked one node at a time could repeat a port the OS just handed out
    ports = iter(free_ports(3 + 3 * 6))
    gcs, dashboard, client = next(ports), next(ports), next(ports)
    # Ray's unix sockets live under the temp dir and their paths must stay under 108 characters:
    # pytest's tmp_path is too deep, so a short directory under /tmp. One per node, as on a real
    # cluster: a node unpacks a job's working_dir into its session folder, deleting what is there,
    # and in a shared one it deleted the folder the job's driver on the head was running in.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjobs-"))
    node_temp_dirs = [temp_dir]
    logs = tmp_path_factory.mktemp("ray_cluster")
    address = f"http://127.0.0.1:{dashboard}"
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{VENV_BIN}:{background_services.env()['PATH']}",  # the job's `python` is the venv's
           # Ray Train's PlacementGroupCleaner finds "its" cluster by scanning /tmp/ray and local GCS
           # processes, which fails with a custom temp dir and other Rays on the machine: name it.
           "RAY_API_SERVER_ADDRESS": address,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # teardown: no drain wait on SIGTERM
    # No --node-ip-address: Ray maps 127.0.0.1 to the machine's own address for its gRPC services
    # anyway; all HTTP (the Jobs API, the State API) goes to the dashboard, bound to 127.0.0.1.
    head = _ray_start(background_services, logs / "head.log", env, ports, "--head", f"--port={gcs}",
                      "--num-cpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                      f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}")
    deadline = time.monotonic() + 120
    try:
        while _http(address, "/api/jobs/", token) != 200:
            assert head.poll() is None, f"`ray start --head` exited with {head.returncode}:\n{(logs / 'head.log').read_text()}"
            assert time.monotonic() < deadline, f"the Jobs API did not come up in 120 s:\n{(logs / 'head.log').read_text()}"
            time.sleep(0.5)
        cluster = SimpleNamespace(address=address, gcs=f"127.0.0.1:{gcs}", token=token, env=env,
                                  temp_dir=temp_dir, logs=logs, node_ids={})
        # one node at a time: two `ray start` processes joining at once on one machine can time out
        # waiting for their own node's record (Ray's 30 s, with the raylet registered after 2 s)
        for pool, cpus in (("cpu", 4), ("gpu", 2)):
            log = logs / f"{pool}.log"
            node_temp_dirs.append(Path(tempfile.mkdtemp(prefix=f"rayjobs-{pool}-")))
            node = _ray_start(background_services, log, {**env, "RAY_OVERRIDE_LABELS": json.dumps({POOL_LABEL: pool})},
                              ports, f"--address=127.0.0.1:{gcs}", f"--num-cpus={cpus}",
                              f"--temp-dir={node_temp_dirs[-1]}")
            while "Ray runtime started" not in log.read_text():
                assert node.poll() is None, f"`ray start` of the {pool} pool exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"the {pool} pool's node did not start in 120 s:\n{log.read_text()}"
                time.sleep(0.5)
        cluster.node_ids = {record.labels[POOL_LABEL]: record.node_id for record in _state(cluster, "nodes")
                            if record.state == "ALIVE" and POOL_LABEL in (record.labels or {})}
        assert set(cluster.node_ids) == {"cpu", "gpu"}, _state(cluster, "nodes")
        yield cluster
    finally:
        background_services.stop_all()
        for folder in node_temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def object_store(background_services, free_ports, tmp_path_factory, shapes_dataset):
    """A real S3 API on 127.0.0.1 (moto's server, in memory) holding the shapes dataset at
    s3://coco/shapes/ in the layout data.root names. ``env``: what a job's runtime_env gives every
    process of the job (driver, Ray Data tasks, train workers) to reach it, as for any S3-compatible
    store (MinIO, a bucket behind a private endpoint): AWS_ENDPOINT_URL and the credentials."""
    import pyarrow.fs as pafs

    port, = free_ports(1)
    log = tmp_path_factory.mktemp("object_store") / "moto.log"
    server = background_services.start([VENV_BIN / "moto_server", "-H", "127.0.0.1", "-p", port], log)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while _http(endpoint, "/", None) != 200:
        assert server.poll() is None and time.monotonic() < deadline, f"moto_server did not start:\n{log.read_text()}"
        time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    bucket = pafs.S3FileSystem(endpoint_override=endpoint, access_key="test", secret_key="test", region="us-east-1",
                               allow_bucket_creation=True)
    bucket.create_dir("coco")
    pafs.copy_files(str(shapes_dataset), "coco/shapes", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=bucket)
    return SimpleNamespace(env=env, filesystem=bucket)


def _state(cluster, resource: str, **filters) -> list:
    """Ray's records of ``resource`` ("nodes", "actors", "tasks") from the State API on the
    dashboard, with the token; ``filters``: equality filters (``job_id=...``)."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token}"})
    options = ListApiOptions(limit=10_000, detail=True, filters=[(k, "=", v) for k, v in filters.items()])
    return client.list(StateResource(resource), options=options, raise_on_missing_output=False)


def _submit(ray_cluster, entrypoint: list[str], *, env: dict[str, str], options: tuple = ()):
    """`ray job submit --no-wait` (the CLI, with ``env``); the finished process."""
    command = [VENV_BIN / "ray", "job", "submit", "--address", ray_cluster.address, "--no-wait", *options,
               "--", *entrypoint]
    return subprocess.run([str(part) for part in command], env=env, capture_output=True, text=True, timeout=120)


def _jobs_client(ray_cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_cluster.address, headers={"Authorization": f"Bearer {ray_cluster.token}"})


def _run_job_from_the_repo(ray_cluster, background_services, object_store, submission_id: str,
                           entrypoint: list) -> "ray.job_submission.JobDetails":
    """`ray job submit --working-dir <repo>` of ``entrypoint`` (without .git; the S3 settings of
    ``object_store`` in its runtime_env), waited for up to 7 minutes; its details once it SUCCEEDED,
    else the failure with its logs."""
    from ray.job_submission import JobStatus

    result = _submit(ray_cluster, entrypoint, env=background_services.env(**ray_cluster.env), options=(
        "--submission-id", submission_id, "--working-dir", REPO,
        "--runtime-env-json", json.dumps({"excludes": [".git"], "env_vars": object_store.env})))
    assert result.returncode == 0, result.stdout + result.stderr
    client = _jobs_client(ray_cluster)
    deadline = time.monotonic() + 420
    while not client.get_job_status(submission_id).is_terminal():
        if time.monotonic() > deadline:  # fail below with the logs so far
            client.stop_job(submission_id)
            break
        time.sleep(2)
    info = client.get_job_info(submission_id)
    assert info.status == JobStatus.SUCCEEDED, (
        f"job {info.status}: {info.message}\n--- job logs ---\n{client.get_job_logs(submission_id)}")
    return info


def test_submission_without_the_right_token_is_rejected(ray_cluster, background_services, tmp_path):
    """Auth is on: the CLI without any token (and a HOME without ~/.ray/auth_token) gets 401, a
    wrong token gets 403, and no job was created."""
    marker = f"rejected-{secrets.token_hex(4)}"
    result = _submit(ray_cluster, ["echo", marker], env=background_services.env(HOME=str(tmp_path)))
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Authentication required" in output, output
    body = json.dumps({"entrypoint": f"echo {marker}"}).encode()
    assert _http(ray_cluster.address, "/api/jobs/", secrets.token_hex(32), "POST", body) == 403
    assert _http(ray_cluster.address, "/api/jobs/", None, "POST", body) == 401
    assert not [job for job in _jobs_client(ray_cluster).list_jobs() if marker in job.entrypoint]


def test_a_submitted_train_job_succeeds_and_tracks_everything_on_the_mlflow_server(
        ray_cluster, mlflow_server, object_store, background_services, monkeypatch, tmp_path):
    """The user's path: `ray job submit --working-dir <repo> -- python -m centernet_ray train ...
    cluster.node_pools=true` with the token, two train workers, the COCO-format dataset, its
    Parquet shards and the run's checkpoints in object storage (S3 API), tracked on a real `mlflow
    server`. The job SUCCEEDS; its data tasks and preprocessing actors ran on the CPU node and its
    train workers on the GPU node; the shards and checkpoints are in the bucket, and a rerun of the
    finished run is answered from Ray Train's records there, naming the same checkpoint; its run on
    the server holds the flattened config, per-step train
    losses, per-evaluation COCO stats, system metrics, the tags, config.yaml, the checkpoint, the
    evaluation pictures and a LoggedModel that loads and runs; the uploaded working dir left out
    what .gitignore and the excludes name (.venv, .git). (With `cluster.node_pools=false` the
    placement assertions fail: the train workers land on the CPU node.)"""
    import mlflow
    import pyarrow.fs as pafs
    import torch
    from mlflow import MlflowClient

    from centernet_ray.config import load_config

    summary_path = tmp_path / "summary.json"
    submission_id = f"centernet-train-{secrets.token_hex(4)}"
    overrides = ["data.root=s3://coco/shapes", "train.storage_path=s3://coco/runs", f"tracking.tracking_uri={mlflow_server.uri}",
                 "tracking.system_metrics_interval_s=1", "tracking.registered_model=shapes",
                 "cluster.node_pools=true", "train.num_workers=2", "data.preprocess_max_actors=2"]
    entrypoint = ["python", "-m", "centernet_ray", "train", TINY_CONFIG, *overrides, "--summary-json", summary_path]
    info = _run_job_from_the_repo(ray_cluster, background_services, object_store, submission_id, entrypoint)
    summary = json.loads(summary_path.read_text())
    assert summary["epochs"] == 1 and 0.0 <= summary["AP"] <= 1.0 and summary["mlflow_run_id"], summary
    assert summary["checkpoint"] == "s3://coco/runs/tiny/epoch_0001", summary
    in_bucket = {info.path for info in object_store.filesystem.get_file_info(pafs.FileSelector("coco", recursive=True))}
    assert {"coco/runs/tiny/epoch_0001/checkpoint.pt", "coco/shapes/parquet/train/_manifest.json",
            "coco/shapes/parquet/val/_manifest.json"} <= in_bucket, sorted(in_bucket)

    # Where Ray ran the job's work, from its own records: data on the CPU pool, training on the GPU pool.
    actors, tasks = _state(ray_cluster, "actors", job_id=info.job_id), _state(ray_cluster, "tasks", job_id=info.job_id)
    where = {node_id: pool for pool, node_id in ray_cluster.node_ids.items()}
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
    assert any(r.node_id == ray_cluster.node_ids["cpu"] for r in data_actors)

    config = load_config(REPO / TINY_CONFIG, overrides)
    tracking = MlflowClient(mlflow_server.uri)
    runs = tracking.search_runs([tracking.get_experiment_by_name(config.tracking.experiment).experiment_id])
    assert [run.info.run_id for run in runs] == [summary["mlflow_run_id"]], runs
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = run.data.params
    assert params["model.backbone"] == "resnet18" and params["loss.alpha"] == "2.0", params
    assert params["train.batch_size"] == "4" and params["targets.max_objects"] == "8", params
    assert params["train.num_workers"] == "2" and params["model.head_conv"] == "16", params
    assert set(params) == set(config.flatten()), set(params) ^ set(config.flatten())

    steps_per_epoch = 24 // 2 // 4  # shapes_dataset has 24 training images; 2 workers, 4 each
    for name in ("train/loss_total", "train/loss_heatmap", "train/loss_size", "train/loss_offset", "train/lr",
                 "train/images_per_s", "train/data_wait_s"):
        history = tracking.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [steps_per_epoch], (name, history)
    for name in ("val/AP", "val/AP50", "val/AP75", "val/ARl", "val/best_AP", "train/epoch_loss_total", "train/epoch",
                 *(f"val_class_AP/{c}" for c in ("circle", "rectangle", "triangle", "cross"))):
        history = tracking.get_metric_history(run.info.run_id, name)
        assert len(history) == 1 and history[0].step == steps_per_epoch, (name, history)
    metrics = run.data.metrics
    assert 0.0 <= metrics["val/AP50"] <= 1.0 and metrics["val/AP"] == pytest.approx(summary["AP"])
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics

    tags = run.data.tags
    assert tags["mlflow.source.name"].startswith("centernet-ray train tiny_train data.root="), tags
    assert tags["mlflow.source.type"] == "JOB"
    assert tags["centernet_ray.command"].startswith(f"centernet-ray train {TINY_CONFIG} data.root=s3://coco/shapes ")
    assert tags["centernet_ray.backbone"] == "resnet18" and tags["centernet_ray.dataset.train_images"] == "24"
    assert "| AP50 |" in tags["mlflow.note.content"]

    artifacts = {a.path for a in tracking.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoint", "val_predictions.png", "evaluation"} <= artifacts, artifacts
    pictures = {a.path for a in tracking.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/per_class_ap.png", "evaluation/precision_recall.png", "evaluation/confusion_matrix.png",
            "evaluation/heatmaps_target_vs_predicted.png", "evaluation/per_class_ap.json"} == pictures
    table = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="evaluation/per_class_ap.json", dst_path=str(tmp_path / "table"),
        tracking_uri=mlflow_server.uri)).read_text())
    assert table["columns"] == ["class", "AP", "AP50", "AP75", "objects"] and len(table["data"]) == 4
    assert [a.path for a in tracking.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/checkpoint.pt"]
    config_file = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml",
                                                           dst_path=str(tmp_path), tracking_uri=mlflow_server.uri))
    assert load_config(config_file) == config
    assert list(mlflow_server.artifacts.rglob("val_predictions.png")), "artifacts did not go through the server"

    models = tracking.search_logged_models([run.info.experiment_id])
    assert [(m.name, m.source_run_id) for m in models] == [("model", run.info.run_id)], models
    local = mlflow.artifacts.download_artifacts(artifact_uri=models[0].artifact_location,
                                                dst_path=str(tmp_path / "model"), tracking_uri=mlflow_server.uri)
    requirements = (Path(local) / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and any(r.startswith("mlflow") for r in requirements)
    model = mlflow.pytorch.load_model(local)
    with torch.no_grad():
        outputs = model(torch.zeros(2, 3, 64, 64))
    shapes = {name: tuple(value.shape) for name, value in outputs.items()}
    assert shapes == {"heatmap": (2, 4, 16, 16), "size": (2, 2, 16, 16), "offset": (2, 2, 16, 16)}, shapes

    # tracking.registered_model: the run's version, ONNX-checked, is the first champion
    version = tracking.get_model_version_by_alias("shapes", "champion")
    assert version.run_id == run.info.run_id and str(version.version) == "1"
    assert str(tracking.get_model_version_by_alias("shapes", "candidate").version) == "1"
    assert version.tags["centernet_ray.promotion"].startswith("first champion (AP ")
    assert summary["promotion"].startswith("shapes version 1: promoted to champion: first champion"), summary
    assert {a.path for a in tracking.list_artifacts(run.info.run_id, "onnx")} == {"onnx/model.onnx", "onnx/export.json"}
    assert tracking.get_run(run.info.run_id).data.metrics["export/passed"] == 1.0

    # The champion at work: `ray job submit -- python -m pipelines.predict` (the job form of
    # `centernet-ray predict`) with models:/shapes@champion from the server, scoring the validation
    # images in the bucket and writing there; with the run's node pools, its preprocessing ran on the
    # CPU node and its model's actors on the GPU node.
    predict_id = f"centernet-predict-{secrets.token_hex(4)}"
    predicted = _run_job_from_the_repo(ray_cluster, background_services, object_store, predict_id, [
        "python", "-m", "pipelines.predict", "--checkpoint", "models:/shapes@champion", "--tracking-uri",
        mlflow_server.uri, "--images", "s3://coco/shapes/images/val", "--annotations",
        "s3://coco/shapes/annotations/instances_val.json", "--output", "s3://coco/predictions"])
    # the alias is read once, as the version it names then: every actor loads that one
    assert "predict: models:/shapes@champion is version shapes/1" in _jobs_client(ray_cluster).get_job_logs(predict_id)
    scores = json.loads(object_store.filesystem.open_input_file("coco/predictions/metrics.json").read())
    assert scores["eval_images"] == 12.0 and 0.0 <= scores["AP50"] <= 1.0, scores
    detections = json.loads(object_store.filesystem.open_input_file("coco/predictions/detections.json").read())
    assert len(detections) == 12 * 100 and {d["category_id"] for d in detections} <= {1, 2, 3, 4}
    workers = [a for a in _state(ray_cluster, "actors", job_id=predicted.job_id) if a.class_name.startswith("MapWorker(")
               and a.node_id is not None]
    model_actors = [a for a in workers if "DetectorActor" in a.class_name]
    assert model_actors and {where.get(a.node_id) for a in model_actors} == {"gpu"}, workers
    assert {where.get(a.node_id) for a in workers if a not in model_actors} <= {"cpu"}, workers

    # The same command again, here (a process without Ray and with the job's S3 settings): the
    # finished run is answered from Ray Train's records in the bucket, without workers, naming the
    # same checkpoint by the same URI; registering it again finds the run's version 1.
    from centernet_ray import ray_runtime
    from centernet_ray.cli import main

    for name, value in object_store.env.items():
        monkeypatch.setenv(name, value)

    def no_ray() -> None:
        raise AssertionError("a finished run's rerun started Ray")
    monkeypatch.setattr(ray_runtime, "init_ray", no_ray)
    rerun = tmp_path / "rerun.json"
    assert main(["train", str(REPO / TINY_CONFIG), *overrides, "--summary-json", str(rerun)]) == 0
    again = json.loads(rerun.read_text())
    assert [again[key] for key in ("checkpoint", "epochs", "mlflow_run_id", "AP")] == [
        summary[key] for key in ("checkpoint", "epochs", "mlflow_run_id", "AP")], (again, summary)
    assert again["promotion"] == summary["promotion"], again
    assert summary["trained"] is True and again["trained"] is False

    # The package the job ran in: the repo without .venv (.gitignore) and .git (excludes).
    package = info.runtime_env["working_dir"].rsplit("/", 1)[-1].removesuffix(".zip")
    unpacked = ray_cluster.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files" / package
    assert unpacked.is_dir(), f"{package} not under {ray_cluster.temp_dir}"
    shipped = {path.name for path in unpacked.iterdir()}
    assert {"centernet_ray", "tests", "tune", "pyproject.toml"} <= shipped, shipped
    assert (unpacked / "centernet_ray" / "configs" / "demo.yaml").is_file()
    assert not shipped & {".venv", ".git", "data", "outputs", "mlflow.db"}, shipped


def test_a_submitted_sweep_nests_every_trial_under_its_run_on_the_mlflow_server(
        ray_cluster, mlflow_server, object_store, background_services, monkeypatch, tmp_path):
    """The README's `ray job submit --working-dir . -- python -m tune.sweep ... train.storage_path=s3://...
    tracking.tracking_uri=http://...`: two one-epoch trials at once (the default config and one
    sample, no scheduler) with `cluster.node_pools=true`, the sweep's storage in the bucket. The job
    SUCCEEDS; the trials' train workers ran on the GPU node; Tune's experiment and the best config
    are in the bucket, and the best config loads from there; the sweep's run and both trials' runs
    are on the server, the trials as its children, each FINISHED with its COCO stats and checkpoint."""
    from mlflow import MlflowClient

    from centernet_ray.config import load_config

    summary_path = tmp_path / "sweep.json"
    submission_id = f"centernet-sweep-{secrets.token_hex(4)}"
    overrides = ["data.root=s3://coco/shapes", "train.storage_path=s3://coco/sweeps",
                 f"tracking.tracking_uri={mlflow_server.uri}", "tune.name=server-sweep",
                 "tracking.experiment=server-sweep",  # the session's server: the train job's experiment too
                 "tune.num_samples=2", "tune.max_concurrent_trials=2", "tune.scheduler=none", "train.epochs=1",
                 "train.batch_size=4", "tracking.system_metrics=false", "cluster.node_pools=true"]
    entrypoint = ["python", "-m", "tune.sweep", "tests/tiny_tune.yaml", *overrides, "--summary-json", summary_path]
    info = _run_job_from_the_repo(ray_cluster, background_services, object_store, submission_id, entrypoint)
    summary = json.loads(summary_path.read_text())
    trials = summary["trials"]
    assert [t["status"] for t in trials] == ["finished", "finished"] and trials[0]["is_default"], trials

    where = {node_id: pool for pool, node_id in ray_cluster.node_ids.items()}
    workers = [a for a in _state(ray_cluster, "actors", job_id=info.job_id) if a.class_name == "RayTrainWorker"]
    assert len(workers) == 2 and {where.get(a.node_id, "head") for a in workers} == {"gpu"}, workers
    assert summary["best"]["config_path"] == "s3://coco/sweeps/server-sweep/best_config.yaml", summary
    for name, value in object_store.env.items():  # what the job's runtime_env gave its processes
        monkeypatch.setenv(name, value)
    best = load_config(summary["best"]["config_path"])  # a config in the bucket loads as a path would
    assert best.train.run_name == "server-sweep-best" and best.data.root == "s3://coco/shapes"

    tracking = MlflowClient(mlflow_server.uri)
    parent = tracking.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["centernet_ray.role"] == "sweep"
    assert parent.data.tags["mlflow.source.type"] == "JOB"
    children = tracking.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_id for r in children) == sorted(t["mlflow_run_id"] for t in trials)
    assert parent.data.tags["mlflow.source.name"].startswith("centernet-ray tune tiny_tune data.root="), parent.data.tags
    for run in children:
        assert run.info.status == "FINISHED" and "val/AP50" in run.data.metrics
        assert run.data.tags["mlflow.source.name"] == parent.data.tags["mlflow.source.name"]
        assert "checkpoint" in {a.path for a in tracking.list_artifacts(run.info.run_id)}


def test_a_bucket_that_does_not_exist_or_an_endpoint_that_does_not_answer_is_a_one_line_error(object_store,
                                                                                              monkeypatch, capsys):
    """As a user mistypes a bucket: `data synth --out` (a write through `storage`, as export's and
    predict's outputs are) names the bucket and the endpoint asked, with exit 2, where pyarrow's
    traceback ended in advice about an option of its own."""
    from centernet_ray.cli import main

    for name, value in object_store.env.items():
        monkeypatch.setenv(name, value)
    endpoint = object_store.env["AWS_ENDPOINT_URL"]
    assert main(["data", "synth", "--out", "s3://no-such-bucket/shapes", "--train-images", "2", "--val-images", "1",
                 "--image-size", "32"]) == 2
    error = capsys.readouterr().err
    assert f"s3://no-such-bucket/shapes: there is no bucket 'no-such-bucket' at {endpoint}" in error, error
    assert "Traceback" not in error and "allow_bucket_creation" not in error
    # what `train`, `tune` and `data ingest` check of their outputs before any work (Ray Train's and
    # Tune's own writes to a missing bucket would end in their tracebacks)
    from centernet_ray import storage
    from centernet_ray.errors import UserInputError

    storage.require_bucket("s3://coco/runs")  # exists
    with pytest.raises(UserInputError, match=f"s3://no-such-bucket/runs: there is no bucket 'no-such-bucket' at {endpoint}"):
        storage.require_bucket("s3://no-such-bucket/runs")
    # an endpoint that does not answer (mistyped, the store down): one line before Ray starts, not
    # pyarrow's traceback from the run folder's lease
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setattr("centernet_ray.ray_runtime.init_ray", lambda: pytest.fail("Ray started"))
    assert main(["train", "demo", "train.storage_path=s3://elsewhere/runs"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: s3://elsewhere/runs/centernet-resnet18: cannot reach the object store at {closed} "
                            "(Could not connect to server): check the endpoint"), error


def _on_the_cluster(ray_cluster, background_services) -> dict[str, str]:
    """The environment of a command joining the cluster through RAY_ADDRESS, as a job's entrypoint
    or a user's shell on a node would, with the cluster's token."""
    return background_services.env(**ray_cluster.env, RAY_ADDRESS=ray_cluster.gcs)


def test_a_command_joining_the_cluster_with_a_sqlite_store_is_told_to_run_a_tracking_server(
        ray_cluster, background_services, shapes_dataset, tmp_path):
    """`centernet-ray train` joined to the 3-node cluster with a SQLite MLflow store: the user is told,
    with the fix, before training starts; here the job then stops at a global batch the dataset
    cannot fill (2 workers x 100 > 24 images), with that reason in one line and nothing trained."""
    command = [sys.executable, "-m", "centernet_ray", "train", REPO / TINY_CONFIG, "cluster.node_pools=true",
               "train.num_workers=2", "train.batch_size=100", f"data.root={shapes_dataset}",
               f"data.parquet_dir={tmp_path / 'parquet'}", f"train.storage_path={tmp_path / 'runs'}",
               f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    finished = subprocess.run([str(part) for part in command], env=_on_the_cluster(ray_cluster, background_services),
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 2, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "the MLflow store sqlite:///" in finished.stderr and "3 nodes" in finished.stderr, finished.stderr
    assert "Run a tracking server (`mlflow server ...`)" in finished.stderr
    assert ("error: 24 training images cannot fill one global batch of 200 (train.batch_size x train.num_workers)"
            in finished.stderr), finished.stderr
    assert not (tmp_path / "runs").exists()


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


def _ingest_on_the_cluster(ray_cluster, background_services, images: Path, annotations: Path, out: Path) -> int:
    """`centernet-ray data ingest --node-pools` joined to the cluster; returns its peak RSS in bytes."""
    script = ("import resource, sys\nfrom centernet_ray.cli import main\ncode = main(sys.argv[1:])\n"
              "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)")
    finished = subprocess.run([sys.executable, "-c", script, "data", "ingest", "--images", str(images),
                               "--annotations", str(annotations), "--out", str(out), "--shard-size", "2000",
                               "--node-pools"], env=_on_the_cluster(ray_cluster, background_services),
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return int(finished.stdout.split("PEAK_RSS_KB")[1].split()[0]) * 1024


def test_ingest_reads_images_in_tasks_on_the_cpu_pool_and_the_driver_holds_no_image_bytes(
        ray_cluster, background_services, tmp_path):
    import pyarrow.parquet as pq

    from centernet_ray.ray_data.ingest import ingest_coco, read_manifest

    small, large = _noise_coco(tmp_path / "small", 500), _noise_coco(tmp_path / "large", 4000)
    before = {t.task_id for t in _state(ray_cluster, "tasks")}  # the cluster's other jobs ingest too
    peak_small = _ingest_on_the_cluster(ray_cluster, background_services, *small, tmp_path / "small-pq")
    peak_large = _ingest_on_the_cluster(ray_cluster, background_services, *large, tmp_path / "large-pq")
    # 3,500 more images of 0.1 MB: 350 MB more bytes read, 2,000 per shard; none of them in the driver
    assert peak_large - peak_small < 100e6, (peak_small, peak_large)

    tasks = [t for t in _state(ray_cluster, "tasks") if "_write_shards_task" in t.name and t.task_id not in before]
    assert len(tasks) >= 3 and {t.node_id for t in tasks} == {ray_cluster.node_ids["cpu"]}, [(t.name, t.node_id) for t in tasks]

    # the same output as ingesting in one process, without Ray: rows, counts, manifest
    reference = ingest_coco(str(small[0]), str(small[1]), str(tmp_path / "reference"), shard_size=2000, use_ray=False)
    def but_each_ingest_s_own_shard_names(manifest):
        return {**manifest, "shards": [name.rsplit("-", 1)[1] for name in manifest["shards"]]}

    assert but_each_ingest_s_own_shard_names(read_manifest(str(tmp_path / "small-pq"))) == \
        but_each_ingest_s_own_shard_names(read_manifest(str(tmp_path / "reference")))
    assert reference.rows == 500 and len(reference.shards) == 1
    assert pq.read_table(tmp_path / "small-pq").equals(pq.read_table(tmp_path / "reference"))
