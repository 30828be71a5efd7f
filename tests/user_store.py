"""What a user finds in MLflow after `centernet-ray train` in a folder with no tracking settings:
the run in that folder's `./mlflow.db`, where `mlflow ui` started there looks. Shared by the tests
that run the command (test_configs_train.py in the session's Ray, test_wheel_install.py from the
installed wheel)."""

from pathlib import Path


def assert_run_is_in_the_user_s_store(folder: Path, run_id: str, *, run_name: str, command: str, shown_as: str,
                                      backbone: str, train_images: int, expected_epochs: int) -> None:
    """Open ``folder``/mlflow.db as `mlflow ui --backend-store-uri sqlite:///mlflow.db` started there
    does, and check the run: finished, its artifacts under ``folder``, its tags (``command``: the start
    of the command line; ``shown_as``: the start of the source the UI shows), datasets, parameters,
    metrics and evaluation pictures. (The URI is spelled out absolute: MLflow caches a store per URI
    string, so in one process a relative URI would keep meaning the folder it was first opened in.)"""
    from mlflow import MlflowClient

    store = Path(folder, "mlflow.db").resolve()
    assert store.is_file()
    client = MlflowClient(f"sqlite:///{store}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == run_name, (run.info.status, run.info.run_name)
    assert run.info.artifact_uri.startswith(str(Path(folder).resolve())), run.info.artifact_uri
    tags = run.data.tags
    assert tags["centernet_ray.command"].startswith(command), tags["centernet_ray.command"]
    assert tags["mlflow.source.name"].startswith(shown_as), tags["mlflow.source.name"]
    assert tags["centernet_ray.backbone"] == backbone
    assert tags["centernet_ray.dataset.train_images"] == str(train_images)
    assert len(tags["centernet_ray.dataset.fingerprint"]) == 64
    assert "| AP |" in tags["mlflow.note.content"]  # the summary table as the run's description
    assert {(d.dataset.name, d.tags[0].value) for d in run.inputs.dataset_inputs} == {("train", "training"),
                                                                                    ("val", "validation")}
    assert run.data.params["model.backbone"] == backbone
    assert run.data.metrics["train/epoch"] == expected_epochs and 0.0 <= run.data.metrics["val/AP50"] <= 1.0
    assert run.data.metrics["train/nonfinite_steps"] == 0  # every step updated the weights
    assert any(name.startswith("val_class_AP/") for name in run.data.metrics)
    evaluation = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert evaluation == {f"evaluation/{name}" for name in (
        "per_class_ap.json", "per_class_ap.png", "precision_recall.png", "confusion_matrix.png",
        "heatmaps_target_vs_predicted.png")}, evaluation
