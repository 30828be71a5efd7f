"""`ray job submit` of the train job to a real Ray head with token authentication (DESIGN.md: the
Jobs API of Ray 2.60 needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN on the head and the client),
tracked on a real `mlflow server`: the path users take from submitting a job to reading it in MLflow."""

import json
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


@pytest.fixture(scope="module")
def ray_head(background_services, free_ports, tmp_path_factory):
    """A real `ray start --head` with its own free ports, temp dir and a throw-away token (the format
    of `ray get-auth-token --generate`), its Jobs API up on 127.0.0.1. Stopped by
    ``background_services``: only this cluster's processes, never a bare `ray stop`."""
    token = secrets.token_hex(32)
    gcs, dashboard, agent_http, agent_grpc, metrics, node_manager, object_manager, client, runtime_env = free_ports(9)
    # Ray's unix sockets live under the temp dir and their paths must stay under 108 characters:
    # pytest's tmp_path is too deep, so a short directory under /tmp.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjobs-"))
    log = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    address = f"http://127.0.0.1:{dashboard}"
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{VENV_BIN}:{background_services.env()['PATH']}",  # the job's `python` is the venv's
           # Ray Train's PlacementGroupCleaner finds "its" cluster by scanning /tmp/ray and local GCS
           # processes, which fails with a custom temp dir and other Rays on the machine: name it.
           "RAY_API_SERVER_ADDRESS": address,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # teardown: no drain wait on SIGTERM
    head = background_services.start([
        # No --node-ip-address: Ray maps 127.0.0.1 to the machine's own address for its gRPC services
        # anyway; all HTTP (the Jobs API) goes to the dashboard, bound to 127.0.0.1.
        VENV_BIN / "ray", "start", "--head", "--block", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        f"--ray-client-server-port={client}", f"--runtime-env-agent-port={runtime_env}",
        "--min-worker-port=0", "--max-worker-port=0",  # workers: ports chosen by the OS
        "--num-cpus=8", "--object-store-memory=1000000000", "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ], log, **env)
    deadline = time.monotonic() + 120
    try:
        while _http(address, "/api/jobs/", token) != 200:
            assert head.poll() is None, f"`ray start` exited with {head.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the Jobs API did not come up in 120 s:\n{log.read_text()}"
            time.sleep(0.5)
        yield SimpleNamespace(address=address, token=token, env=env, temp_dir=temp_dir, log=log)
    finally:
        background_services.stop_all()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(ray_head, entrypoint: list[str], *, env: dict[str, str], options: tuple = ()):
    """`ray job submit --no-wait` (the CLI, with ``env``); the finished process."""
    command = [VENV_BIN / "ray", "job", "submit", "--address", ray_head.address, "--no-wait", *options,
               "--", *entrypoint]
    return subprocess.run([str(part) for part in command], env=env, capture_output=True, text=True, timeout=120)


def _jobs_client(ray_head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_head.address, headers={"Authorization": f"Bearer {ray_head.token}"})


def test_submission_without_the_right_token_is_rejected(ray_head, background_services, tmp_path):
    """Auth is on: the CLI without any token (and a HOME without ~/.ray/auth_token) gets 401, a
    wrong token gets 403, and no job was created."""
    marker = f"rejected-{secrets.token_hex(4)}"
    result = _submit(ray_head, ["echo", marker], env=background_services.env(HOME=str(tmp_path)))
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Authentication required" in output, output
    body = json.dumps({"entrypoint": f"echo {marker}"}).encode()
    assert _http(ray_head.address, "/api/jobs/", secrets.token_hex(32), "POST", body) == 403
    assert _http(ray_head.address, "/api/jobs/", None, "POST", body) == 401
    assert not [job for job in _jobs_client(ray_head).list_jobs() if marker in job.entrypoint]


def test_a_submitted_train_job_succeeds_and_tracks_everything_on_the_mlflow_server(
        ray_head, mlflow_server, background_services, shapes_dataset, tmp_path):
    """The user's path: `ray job submit --working-dir <repo> -- python -m centernet_ray train ...`
    with the token, tracked on a real `mlflow server`. The job SUCCEEDS; its run on the server holds
    the flattened config, per-step train losses, per-evaluation COCO stats, system metrics, the
    tags, config.yaml, the checkpoint, the evaluation pictures and a LoggedModel that loads and
    runs; the uploaded working dir left out what .gitignore and the excludes name (.venv, .git)."""
    import mlflow
    import torch
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus

    from centernet_ray.config import load_config

    summary_path = tmp_path / "summary.json"
    submission_id = f"centernet-train-{secrets.token_hex(4)}"
    overrides = [f"data.root={shapes_dataset}", f"data.parquet_dir={tmp_path / 'parquet'}",
                 f"train.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={mlflow_server.uri}",
                 "tracking.system_metrics_interval_s=1", "tracking.registered_model=shapes"]
    entrypoint = ["python", "-m", "centernet_ray", "train", TINY_CONFIG, *overrides, "--summary-json", summary_path]
    result = _submit(ray_head, entrypoint, env=background_services.env(**ray_head.env), options=(
        "--submission-id", submission_id, "--working-dir", REPO, "--runtime-env-json", '{"excludes": [".git"]}'))
    assert result.returncode == 0, result.stdout + result.stderr

    client = _jobs_client(ray_head)
    deadline = time.monotonic() + 420
    while not client.get_job_status(submission_id).is_terminal():
        if time.monotonic() > deadline:  # fail below with the logs so far
            client.stop_job(submission_id)
            break
        time.sleep(2)
    info = client.get_job_info(submission_id)
    assert info.status == JobStatus.SUCCEEDED, (
        f"job {info.status}: {info.message}\n--- job logs ---\n{client.get_job_logs(submission_id)}")
    summary = json.loads(summary_path.read_text())
    assert summary["epochs"] == 1 and 0.0 <= summary["AP"] <= 1.0 and summary["mlflow_run_id"], summary

    config = load_config(REPO / TINY_CONFIG, overrides)
    tracking = MlflowClient(mlflow_server.uri)
    runs = tracking.search_runs([tracking.get_experiment_by_name(config.tracking.experiment).experiment_id])
    assert [run.info.run_id for run in runs] == [summary["mlflow_run_id"]], runs
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = run.data.params
    assert params["model.backbone"] == "resnet18" and params["loss.alpha"] == "2.0", params
    assert params["train.batch_size"] == "4" and params["targets.max_objects"] == "8", params
    assert params["train.num_workers"] == "1" and params["model.head_conv"] == "16", params
    assert set(params) == set(config.flatten()), set(params) ^ set(config.flatten())

    steps_per_epoch = 24 // 4  # shapes_dataset has 24 training images
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
    assert tags["centernet_ray.command"].startswith(f"centernet-ray train {TINY_CONFIG} data.root={shapes_dataset} ")
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

    # The package the job ran in: the repo without .venv (.gitignore) and .git (excludes).
    package = info.runtime_env["working_dir"].rsplit("/", 1)[-1].removesuffix(".zip")
    unpacked = ray_head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files" / package
    assert unpacked.is_dir(), f"{package} not under {ray_head.temp_dir}"
    shipped = {path.name for path in unpacked.iterdir()}
    assert {"centernet_ray", "tests", "tune", "pyproject.toml"} <= shipped, shipped
    assert (unpacked / "centernet_ray" / "configs" / "demo.yaml").is_file()
    assert not shipped & {".venv", ".git", "data", "outputs", "mlflow.db"}, shipped
