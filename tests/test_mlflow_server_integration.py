"""A sweep against a real `mlflow server` (SQLite backend, proxied artifact store): the sweep's
trials land on the server nested under its run. (A training run's params, metrics, tags, pictures
and model on the server: the `ray job submit` test in test_jobs_integration.py.)"""

from pathlib import Path

import pytest

from centernet_ray.config import load_config

pytestmark = pytest.mark.integration


def test_a_sweep_nests_every_trial_under_its_run_on_the_server(ray_session, mlflow_server, shapes_dataset, tmp_path):
    """Two one-epoch trials (the default config and one sample), no scheduler: the sweep's run and
    both trials' runs are on the server, the trials as its children."""
    from mlflow import MlflowClient

    from centernet_ray.ray_tune.search_space import load_search_space
    from centernet_ray.ray_tune.sweep import run_sweep

    config = load_config(Path(__file__).with_name("tiny_tune.yaml"), [
        f"data.root={shapes_dataset}", f"data.parquet_dir={tmp_path / 'parquet'}",
        f"train.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={mlflow_server.uri}",
        "tune.name=server-sweep", "tracking.experiment=server-sweep",  # the session's server: a job test's too
        "tune.num_samples=2", "tune.max_concurrent_trials=2", "tune.scheduler=none", "train.epochs=1", "train.batch_size=4",
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
