"""Where MLflow runs land and how they are named: store resolution on the driver, tags, metric names."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from centernet_ray import storage
from centernet_ray.config import load_config
from centernet_ray.tracking import command_line, epoch_metric_names, metric_name, run_tags


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:///mlflow.db", "sqlite:///{cwd}/mlflow.db"),
    ("sqlite:///runs/m.db", "sqlite:///{cwd}/runs/m.db"),
    ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("mlruns", "file://{cwd}/mlruns"),
    ("./mlruns", "file://{cwd}/mlruns"),
    ("file:mlruns", "file://{cwd}/mlruns"),
    ("file:///abs/mlruns", "file:///abs/mlruns"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("databricks", "databricks"),
    ("postgresql://user@host/db", "postgresql://user@host/db"),
])
def test_relative_stores_are_made_absolute_in_the_current_directory(uri, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute_tracking_uri(uri) == expected.format(cwd=tmp_path.resolve())


@pytest.mark.parametrize("uri, local", [("sqlite:////a/m.db", True), ("file:///a", True), ("/a/mlruns", True),
                                        ("http://h:5000", False), ("https://h", False), ("databricks", False)])
def test_node_local_stores_are_recognised(uri, local):
    assert storage.is_node_local_store(uri) is local


def test_the_default_store_is_the_environment_s_else_mlflow_db_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert storage.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from_env.db")
    assert storage.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/from_env.db"
    assert storage.tracking_uri("http://server:5000") == "http://server:5000"


def test_configs_shipped_to_workers_carry_the_resolved_store(tmp_path, monkeypatch):
    """The workers' environment and working directory are not the driver's: the config says where."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    resolved = storage.with_absolute_paths(load_config(None))
    assert resolved.tracking.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert storage.with_absolute_paths(resolved).tracking.tracking_uri == resolved.tracking.tracking_uri


def test_the_run_source_is_the_command_as_typed():
    assert command_line(["/venv/bin/centernet-ray", "train", "a b.yaml", "train.epochs=2"]) == \
        "centernet-ray train 'a b.yaml' train.epochs=2"
    assert command_line(["/src/centernet_ray/__main__.py", "tune"]) == "centernet-ray tune"
    assert command_line(["/home/me/train_coco.py", "--fast"]) == "train_coco.py --fast"
    assert command_line(["/venv/lib/site-packages/pytest/__main__.py", "-q"]) == "python -m pytest -q"


def test_the_source_shown_by_mlflow_keeps_file_names_only():
    """MLflow's UI shows a run's source after its last '/': paths are shortened so it reads whole."""
    from centernet_ray.tracking import display_command

    assert display_command("centernet-ray train /data/cfg/coco_resdcn18.yaml data.root=/data/coco/ "
                           "--summary-json /tmp/out/s.json train.lr=1e-3") == \
        "centernet-ray train coco_resdcn18 data.root=coco --summary-json s.json train.lr=1e-3"
    assert display_command("centernet-ray train train.ema=true") == "centernet-ray train train.ema=true"
    assert display_command("centernet-ray 'unbalanced") == "centernet-ray 'unbalanced"


def test_run_tags_name_the_code_model_dataset_and_versions():
    import ray
    import torch

    tags = run_tags(load_config(None), "centernet-ray train", {"fingerprint": "abc", "train_images": 10})
    assert tags["mlflow.source.name"] == tags["centernet_ray.command"] == "centernet-ray train"
    assert tags["centernet_ray.backbone"] == "resnet18"
    assert tags["centernet_ray.dataset.fingerprint"] == "abc" and tags["centernet_ray.dataset.train_images"] == "10"
    assert tags["ray.version"] == ray.__version__ and tags["torch.version"] == torch.__version__
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # a checkout: the commit is known
        assert len(tags["mlflow.source.git.commit"]) == 40


def test_epoch_metrics_are_grouped_by_section():
    report = {"epoch": 3, "images_per_s": 210.0, "nonfinite_steps": 0, "loss_total": 1.5, "AP": 0.5, "AP50": 0.8,
              "best_AP": 0.5, "eval_images": 200.0, "mlflow_run_id": "abc"}
    assert epoch_metric_names(report) == {
        "train/epoch": 3.0, "train/epoch_images_per_s": 210.0, "train/nonfinite_steps": 0.0,
        "train/epoch_loss_total": 1.5, "val/AP": 0.5, "val/AP50": 0.8, "val/best_AP": 0.5, "val/images": 200.0}
    assert metric_name("val_class_AP/traffic light (v2)") == "val_class_AP/traffic light _v2_"


def test_the_experiment_keeps_its_artifacts_beside_a_sqlite_store(tmp_path, monkeypatch):
    """MLflow would put them in ./mlruns of whichever process created the experiment (a Ray worker's
    session folder, or any directory the command ran from)."""
    from mlflow import MlflowClient

    from centernet_ray.tracking import ensure_experiment

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = load_config(None, [f"tracking.tracking_uri=sqlite:///{tmp_path}/store/m.db", "tracking.experiment=a b"])
    (tmp_path / "store").mkdir()
    experiment_id = ensure_experiment(config)
    assert ensure_experiment(config) == experiment_id  # found, not created twice
    location = MlflowClient(f"sqlite:///{tmp_path}/store/m.db").get_experiment(experiment_id).artifact_location
    assert location == str(tmp_path / "store" / "mlruns" / "a_b")
    assert not (tmp_path / "elsewhere" / "mlruns").exists()


def test_a_dataset_input_lost_to_a_concurrent_insert_is_logged_on_the_retry(tmp_path, monkeypatch):
    """Trials of a sweep that start together log the same dataset, and MLflow's store looks a dataset
    up before inserting it: one of them got a unique-key error and its trial failed (a sweep of two
    concurrent trials on an `mlflow server`). The race is staged by failing the first `log_input`
    as the store does; the retry logs the input and the run goes on."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from centernet_ray.tracking import DatasetInput, RunTracker

    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(None, [f"tracking.tracking_uri={store}", "tracking.system_metrics=false"])
    annotations = tmp_path / "instances_train.json"
    annotations.write_text("{}")
    real_log_input, calls = mlflow.log_input, []

    def racing_log_input(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        return real_log_input(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", racing_log_input)
    monkeypatch.setattr("centernet_ray.tracking.time.sleep", lambda seconds: None)
    try:
        tracker = RunTracker(config, "race", datasets=[DatasetInput("train", str(annotations), "f" * 64, "training")])
        tracker.close()
    finally:
        mlflow.set_tracking_uri(None)
    run = MlflowClient(store).get_run(tracker.run_id)
    assert len(calls) == 2 and run.info.status == "FINISHED"
    assert [(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs] == [("train", "f" * 12)]


def test_every_attempt_of_one_launch_logs_to_one_run_and_the_driver_ends_it_by_the_launch(tmp_path, monkeypatch):
    """An attempt whose worker died before the first checkpoint leaves its run RUNNING; the next
    attempt of the same launch continues that run, and the driver marks it by the launch's tag. A
    later launch that resumes the run from a checkpoint takes the run over."""
    import mlflow
    from mlflow import MlflowClient

    from centernet_ray.tracking import LAUNCH_TAG, RunTracker, end_running_launch_runs, launch_run_id

    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(None, [f"tracking.tracking_uri={store}", "tracking.system_metrics=false"])
    client = MlflowClient(store)
    try:
        assert launch_run_id(config, "first") is None  # no experiment yet
        died = RunTracker(config, "job", launch="first")
        mlflow.end_run()
        client.update_run(died.run_id, "RUNNING")  # as the store keeps the run of a process that died
        retried = RunTracker(config, "job", launch="first")
        assert retried.run_id == died.run_id and launch_run_id(config, "first") == died.run_id
        mlflow.end_run()
        client.update_run(died.run_id, "RUNNING")
        assert end_running_launch_runs(config, "first", "FAILED") == died.run_id
        assert end_running_launch_runs(config, "first", "FAILED") is None  # nothing RUNNING is left
        assert client.get_run(died.run_id).info.status == "FAILED"

        other = RunTracker(config, "job", launch="other")  # another launch: a run of its own
        other.close()
        experiment_id = client.get_experiment_by_name(config.tracking.experiment).experiment_id
        bare = client.create_run(experiment_id, tags={LAUNCH_TAG: "bare"})  # died before it logged anything
        continued = RunTracker(config, "job", launch="bare")
        continued.close()
        resumed = RunTracker(config, "job", run_id=died.run_id, launch="second")  # from a checkpoint
        mlflow.end_run()
        client.update_run(died.run_id, "RUNNING")
    finally:
        mlflow.set_tracking_uri(None)
    assert other.run_id != died.run_id and resumed.run_id == died.run_id
    assert continued.run_id == bare.info.run_id and client.get_run(bare.info.run_id).data.params["train.lr"]
    assert client.get_run(died.run_id).data.tags[LAUNCH_TAG] == "second"
    assert end_running_launch_runs(config, "second", "KILLED") == died.run_id
    runs = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])
    assert sorted((run.info.run_id, run.info.status) for run in runs) == sorted(
        [(died.run_id, "KILLED"), (other.run_id, "FINISHED"), (bare.info.run_id, "FINISHED")])


def test_a_trial_stopped_by_asha_ends_finished_whichever_side_records_its_end_first(tmp_path, monkeypatch):
    """When ASHA stops a trial, the sweep's driver ends the trial's run FINISHED (tagged "stopped
    early") while the trial's workers are torn down, and their loop sees the teardown as an exception
    and closes the run FAILED. Either may come first: the run ends FINISHED both ways (one order
    left it FAILED in a `.ci/run`)."""
    import mlflow
    from mlflow import MlflowClient

    from centernet_ray.ray_tune.sweep_tracking import TrialRunCloser
    from centernet_ray.tracking import RunTracker

    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(None, [f"tracking.tracking_uri={store}", "tracking.system_metrics=false",
                                "train.epochs=2"])
    client, closer = MlflowClient(store), TrialRunCloser(config, epochs=2)

    def stopped_after_one_epoch(run_id: str) -> SimpleNamespace:
        return SimpleNamespace(trial_id="t", last_result={"mlflow_run_id": run_id, "epoch": 1}, status="TERMINATED")

    try:
        workers_first = RunTracker(config, "trial")
        workers_first.close("FAILED")  # the teardown reached the loop first
        trial = stopped_after_one_epoch(workers_first.run_id)
        closer.on_trial_complete(0, [trial], trial)

        driver_first = RunTracker(config, "trial")
        trial = stopped_after_one_epoch(driver_first.run_id)
        closer.on_trial_complete(0, [trial], trial)  # the driver first, the loop's close after it
        driver_first.close("FAILED")
    finally:
        mlflow.set_tracking_uri(None)
    for tracker in (workers_first, driver_first):
        run = client.get_run(tracker.run_id)
        assert (run.info.status, run.data.tags["centernet_ray.tune_status"]) == ("FINISHED", "stopped early")
    failing = RunTracker(config, "plain")  # a run nobody else ended still ends FAILED
    failing.close("FAILED")
    mlflow.set_tracking_uri(None)
    assert client.get_run(failing.run_id).info.status == "FAILED"
