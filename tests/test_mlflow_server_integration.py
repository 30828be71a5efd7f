"""The train job and a sweep against a real `mlflow server` (SQLite backend, proxied artifact store):
params, metrics, tags, the evaluation pictures, the logged model, and the sweep's trials nested
under its run all land on the server."""

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from centernet_ray.config import load_config

pytestmark = pytest.mark.integration

TINY_CONFIG = Path(__file__).with_name("tiny_train.yaml")
VENV_BIN = Path(sys.executable).parent


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
            return response.status == 200
    except OSError:  # connection refused while the server starts, HTTP errors, timeouts
        return False


@pytest.fixture(scope="module")
def mlflow_server(background_services, free_ports, tmp_path_factory):
    """`mlflow server` on 127.0.0.1 and a free port, one worker, SQLite backend; artifacts go through
    the server (mlflow-artifacts:/) into ``artifacts``. Terminated by ``background_services``."""
    root = tmp_path_factory.mktemp("mlflow_server")
    (port,) = free_ports(1)
    log = root / "server.log"
    server = background_services.start([
        VENV_BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", port, "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}", "--artifacts-destination", root / "artifacts",
    ], log)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not _healthy(uri):
        assert server.poll() is None, f"`mlflow server` exited with {server.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"`mlflow server` not healthy in 120 s:\n{log.read_text()}"
        time.sleep(0.5)
    yield SimpleNamespace(uri=uri, artifacts=root / "artifacts", log=log)


def test_training_logs_params_metrics_artifacts_and_model_to_the_server(ray_session, mlflow_server, shapes_dataset,
                                                                       tmp_path):
    """One tiny training run (Python API, the session's local Ray) tracked at the server: flattened
    config params, per-step train losses, per-evaluation COCO stats, config.yaml, the checkpoint,
    the prediction picture, and a LoggedModel that loads and runs."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from centernet_ray.ray_train.job import run_training

    config = load_config(TINY_CONFIG, [
        f"data.root={shapes_dataset}", f"data.parquet_dir={tmp_path / 'parquet'}",
        f"train.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={mlflow_server.uri}",
        "tracking.system_metrics_interval_s=1"])
    summary = run_training(config, source="centernet-ray train tests/tiny_train.yaml")
    assert summary.mlflow_run_id, summary

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = run.data.params
    assert params["model.backbone"] == "resnet18" and params["loss.alpha"] == "2.0", params
    assert params["train.batch_size"] == "4" and params["targets.max_objects"] == "8", params
    assert set(params) == set(config.flatten()), set(params) ^ set(config.flatten())

    steps_per_epoch = 24 // 4  # shapes_dataset has 24 training images
    for name in ("train/loss_total", "train/loss_heatmap", "train/loss_size", "train/loss_offset", "train/lr",
                 "train/images_per_s", "train/data_wait_s"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [steps_per_epoch], (name, history)
    for name in ("val/AP", "val/AP50", "val/AP75", "val/ARl", "val/best_AP", "train/epoch_loss_total", "train/epoch",
                 *(f"val_class_AP/{c}" for c in ("circle", "rectangle", "triangle", "cross"))):
        history = client.get_metric_history(run.info.run_id, name)
        assert len(history) == 1 and history[0].step == steps_per_epoch, (name, history)
    metrics = run.data.metrics
    assert 0.0 <= metrics["val/AP50"] <= 1.0 and metrics["val/AP"] == pytest.approx(summary.stats["AP"])
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics

    tags = run.data.tags
    assert tags["mlflow.source.name"] == "centernet-ray train tiny_train"
    assert tags["centernet_ray.command"] == "centernet-ray train tests/tiny_train.yaml"
    assert tags["centernet_ray.backbone"] == "resnet18" and tags["centernet_ray.dataset.train_images"] == "24"
    assert "| AP50 |" in tags["mlflow.note.content"]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoint", "val_predictions.png", "evaluation"} <= artifacts, artifacts
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/per_class_ap.png", "evaluation/precision_recall.png", "evaluation/confusion_matrix.png",
            "evaluation/heatmaps_target_vs_predicted.png", "evaluation/per_class_ap.json"} == pictures
    table = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="evaluation/per_class_ap.json", dst_path=str(tmp_path / "table"),
        tracking_uri=mlflow_server.uri)).read_text())
    assert table["columns"] == ["class", "AP", "AP50", "AP75", "objects"] and len(table["data"]) == 4
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/checkpoint.pt"]
    config_file = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml",
                                                           dst_path=str(tmp_path), tracking_uri=mlflow_server.uri))
    assert load_config(config_file) == config
    assert list(mlflow_server.artifacts.rglob("val_predictions.png")), "artifacts did not go through the server"

    experiment = client.get_experiment_by_name(config.tracking.experiment)
    models = client.search_logged_models([experiment.experiment_id])
    assert [(m.name, m.source_run_id) for m in models] == [("model", run.info.run_id)], models
    local = mlflow.artifacts.download_artifacts(artifact_uri=models[0].artifact_location,
                                                dst_path=str(tmp_path / "model"), tracking_uri=mlflow_server.uri)
    model = mlflow.pytorch.load_model(local)
    with torch.no_grad():
        outputs = model(torch.zeros(2, 3, 64, 64))
    shapes = {name: tuple(value.shape) for name, value in outputs.items()}
    assert shapes == {"heatmap": (2, 4, 16, 16), "size": (2, 2, 16, 16), "offset": (2, 2, 16, 16)}, shapes


def test_a_sweep_nests_every_trial_under_its_run_on_the_server(ray_session, mlflow_server, shapes_dataset, tmp_path):
    """Two one-epoch trials (the default config and one sample), no scheduler: the sweep's run and
    both trials' runs are on the server, the trials as its children."""
    from mlflow import MlflowClient

    from centernet_ray.ray_tune.search_space import load_search_space
    from centernet_ray.ray_tune.sweep import run_sweep

    config = load_config(Path(__file__).with_name("tiny_tune.yaml"), [
        f"data.root={shapes_dataset}", f"data.parquet_dir={tmp_path / 'parquet'}",
        f"train.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={mlflow_server.uri}",
        "tune.name=server-sweep", "tune.num_samples=2", "tune.max_concurrent_trials=2", "tune.scheduler=none", "train.epochs=1", "train.batch_size=4",
        "tracking.system_metrics=false"])
    space = load_search_space(Path(__file__).with_name("tiny_space.yaml"), config)
    summary = run_sweep(config, space, source="centernet-ray tune tests/tiny_tune.yaml")

    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(summary.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["centernet_ray.role"] == "sweep"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_id for r in children) == sorted(t.mlflow_run_id for t in summary.trials)
    for run in children:
        assert run.info.status == "FINISHED" and "val/AP50" in run.data.metrics
        assert run.data.tags["mlflow.source.name"] == "centernet-ray tune tiny_tune"
        assert "checkpoint" in {a.path for a in client.list_artifacts(run.info.run_id)}
