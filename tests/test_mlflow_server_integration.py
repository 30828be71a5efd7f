"""The train job against a real `mlflow server` (SQLite backend, proxied artifact store): params,
metrics, artifacts and the logged model all land on the server."""

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

    from centernet_ray.training.job import run_training

    config = load_config(TINY_CONFIG, [
        f"data.root={shapes_dataset}", f"data.parquet_dir={tmp_path / 'parquet'}",
        f"train.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={mlflow_server.uri}"])
    summary = run_training(config)
    assert summary.mlflow_run_id, summary

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = run.data.params
    assert params["model.backbone"] == "resnet18" and params["loss.alpha"] == "2.0", params
    assert params["train.batch_size"] == "4" and params["targets.max_objects"] == "8", params
    assert set(params) == set(config.flatten()), set(params) ^ set(config.flatten())

    steps_per_epoch = 24 // 4  # shapes_dataset has 24 training images
    for name in ("train_total", "train_heatmap", "train_size", "train_offset", "train_lr"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [steps_per_epoch], (name, history)
    for name in ("AP", "AP50", "AP75", "ARl", "loss_total", "best_AP"):
        history = client.get_metric_history(run.info.run_id, name)
        assert len(history) == 1 and history[0].step == steps_per_epoch, (name, history)
    assert 0.0 <= run.data.metrics["AP50"] <= 1.0 and run.data.metrics["AP"] == pytest.approx(summary.stats["AP"])

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoint", "val_predictions.png"} <= artifacts, artifacts
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
