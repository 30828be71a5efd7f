"""Where a Ray job's outputs would land: the warnings of ``ray_runtime`` (no Ray started)."""

import logging

from centernet_ray import ray_runtime
from centernet_ray.tracking import RAY_JOB_ENV


def test_outputs_inside_a_ray_job_s_working_dir_are_warned_about_with_the_fix(tmp_path, monkeypatch, caplog):
    """A Ray job's entrypoint runs in the job's working_dir copy (under its session's
    runtime_resources), which Ray deletes: a run's checkpoints, a predict output or a SQLite store
    there would be lost with it. The same folder from a plain command, a bucket, or a path outside
    it are not warned about."""
    working_dir = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    working_dir.mkdir(parents=True)
    monkeypatch.chdir(working_dir)
    runs, store = working_dir / "outputs" / "ray_results", f"sqlite:///{working_dir / 'mlflow.db'}"
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="centernet_ray.ray_runtime"):
        ray_runtime.warn_if_storage_in_job_working_dir(str(runs))
        ray_runtime.warn_if_node_local_tracking(store)
        assert not caplog.records  # not a job
        monkeypatch.setenv(RAY_JOB_ENV, "{}")  # as Ray's job supervisor starts the entrypoint
        ray_runtime.warn_if_storage_in_job_working_dir(str(runs))
        ray_runtime.warn_if_storage_in_job_working_dir("s3://bucket/runs")
        ray_runtime.warn_if_storage_in_job_working_dir(str(tmp_path / "lasting" / "runs"))
        ray_runtime.warn_if_node_local_tracking(store)
        ray_runtime.warn_if_in_job_working_dir(str(working_dir / "predictions"), "predict's --output",
                                               "give a bucket URI or a lasting path")
    assert [record.getMessage() for record in caplog.records] == [
        f"train.storage_path {runs} is inside this Ray job's working_dir, a copy Ray deletes with its session: set "
        "train.storage_path (or CENTERNET_RAY_STORAGE in the job's runtime_env) to a bucket URI or a lasting path",
        f"the MLflow store {store} is inside this Ray job's working_dir, a copy Ray deletes with its session: set "
        "tracking.tracking_uri (or MLFLOW_TRACKING_URI in the job's runtime_env) to a tracking server or a lasting path",
        f"predict's --output {working_dir / 'predictions'} is inside this Ray job's working_dir, a copy Ray deletes "
        "with its session: give a bucket URI or a lasting path"]


def test_a_file_missing_here_is_refused_unless_a_joined_cluster_s_nodes_may_have_it(monkeypatch, caplog):
    """A URI is missing for every node, and a Ray this command starts is this machine: refused. On a
    cluster joined (RAY_ADDRESS, or a Ray job), the workers' nodes may hold a local path: a warning."""
    import pytest

    from centernet_ray.errors import UserInputError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    with pytest.raises(UserInputError, match="^no /w/dla34.pth$"):
        ray_runtime.refuse_or_warn_missing("/w/dla34.pth", "no /w/dla34.pth")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(UserInputError, match="^no s3://b/dla34.pth$"):
        ray_runtime.refuse_or_warn_missing("s3://b/dla34.pth", "no s3://b/dla34.pth")
    with caplog.at_level(logging.WARNING, logger="centernet_ray.ray_runtime"):
        ray_runtime.refuse_or_warn_missing("/w/dla34.pth", "no /w/dla34.pth here")
    assert [record.getMessage() for record in caplog.records] == ["no /w/dla34.pth here"]
