"""The sweep on a real local Ray: stopped after the first trial, resume, ASHA, nested MLflow runs, best config.

One sweep of 2 trials (tests/tiny_tune.yaml + tests/tiny_space.yaml): the first trial trains the
default config, the sampled one has a learning rate of 1e-9 and cannot learn. The sweep runs
as `centernet-ray tune` in a subprocess attached to the session's Ray, gets SIGTERM (what `ray job
stop` and Kubernetes send; the command turns it into Ctrl+C's SIGINT, which
test_train_integration.py sends to a training run) as soon as the first trial finishes, and is then
resumed with the same name and storage path.

Both run in a fresh directory with no MLflow settings, as a new user runs them: the sweep's run and
every trial's run must be in that directory's `mlflow.db`, where `mlflow ui` looks.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from centernet_ray.config import load_config, with_overrides
from centernet_ray.data.synthetic import write_shapes_dataset

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "tiny_tune.yaml"


@pytest.fixture(scope="module")
def sweep_paths(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep")
    dataset = write_shapes_dataset(base / "shapes", num_train=320, num_val=32, image_size=64, seed=3)
    # the dataset by a relative path, as a user in its folder gives it (both commands run in `base`)
    overrides = [f"data.root={dataset.name}", f"data.parquet_dir={base / 'parquet'}", f"train.storage_path={base / 'runs'}",
                 f"tune.search_space={ROOT / 'tests' / 'tiny_space.yaml'}"]
    return base, overrides


def _wait_for_line(process, needle, log, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                return False
            continue
        log.append(line)
        if needle in line:
            return True
    return False


@pytest.fixture(scope="module")
def interrupted_then_resumed(ray_session, sweep_paths):
    """(output of the interrupted run, its exit code, the resumed run's summary)."""
    import ray

    from centernet_ray.ray_tune.search_space import load_search_space
    from centernet_ray.ray_tune.sweep import run_sweep

    base, overrides = sweep_paths
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen([sys.executable, "-m", "centernet_ray", "tune", str(CONFIG), *overrides], cwd=base,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    try:
        finished = _wait_for_line(process, "finished after epoch 2/2", log, timeout=400)
        assert finished, "the first trial never finished:\n" + "".join(log[-60:])
        process.send_signal(signal.SIGTERM)  # `ray job stop`: stopped as by Ctrl+C
        out, _ = process.communicate(timeout=180)
        log.append(out)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    config = load_config(CONFIG, overrides)
    with pytest.MonkeyPatch.context() as patch:  # the resume: same directory, same default store
        patch.chdir(base)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary = run_sweep(config, load_search_space(config.tune.search_space, config))
    return "".join(log), process.returncode, summary


def test_an_interrupted_sweep_resumes_and_completes_the_rest_without_repeating_a_trial(interrupted_then_resumed):
    from ray.tune import ExperimentAnalysis

    output, code, summary = interrupted_then_resumed
    assert code == 130 and "rerun the same command" in output, output[-3000:]
    assert len(summary.trials) == 2
    assert all(t.status in ("finished", "stopped early") for t in summary.trials), summary.trials
    first = summary.trials[0]
    assert first.is_default and first.status == "finished" and first.epochs == 2
    started = [line for line in output.splitlines() if " started (" in line]
    assert started and first.trial_id in started[0]
    # Ray Tune's own record of the first trial: one row per evaluation report (epochs 1 and 2). A rerun
    # would have appended at least one more (a finished Train run rerun reports again).
    analysis = ExperimentAnalysis(str(Path(summary.best_config_path).parent))
    rows = analysis.trial_dataframes[first.trial_id]
    assert list(rows["epoch"]) == [1, 2]
    # the resume was compared with the dataset the sweep started on (a changed one is refused: test_tuning.py)
    from centernet_ray.checkpoint import DATA_LOCATIONS_FILE
    from centernet_ray.data.identity import ANNOTATIONS_SHA256_KEYS
    from centernet_ray.ray_tune.sweep import SWEEP_STATE_FILE

    state = json.loads((Path(summary.best_config_path).parent / SWEEP_STATE_FILE).read_text())
    annotations = Path(summary.best_config_path).parents[2] / "shapes" / "annotations" / "instances_train.json"
    assert state["dataset"][ANNOTATIONS_SHA256_KEYS["train"]] == hashlib.sha256(annotations.read_bytes()).hexdigest()
    # ...and each trial's checkpoints keep the sweep command's locations, relative as given, not the absolute
    # paths its config has: a sweep resumed in another folder (its Ray job's next session) would refuse them
    for trial in summary.trials:
        kept = json.loads((Path(trial.checkpoint) / DATA_LOCATIONS_FILE).read_text())
        assert kept["data.root"] == "shapes" and kept == state["dataset"], (kept, state["dataset"])


def test_asha_stops_the_clearly_worse_trials_after_their_first_evaluation(interrupted_then_resumed):
    _, _, summary = interrupted_then_resumed
    good, *bad = summary.trials
    assert all(t.params["train.lr"] == pytest.approx(1e-9) for t in bad)
    assert good.metrics["AP50"] > max(t.metrics["AP50"] for t in bad)
    stopped = [t for t in bad if t.status == "stopped early"]
    assert stopped and all(t.epochs == 1 for t in stopped)
    assert summary.best is good and summary.default is good


def test_stopped_trials_give_their_cpus_back(interrupted_then_resumed, ray_session):
    import ray

    deadline = time.monotonic() + 90  # Ray Train's PlacementGroupCleaner polls the State API
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"], ray.available_resources()


def test_every_trial_is_an_mlflow_run_nested_under_the_sweep_run(interrupted_then_resumed, sweep_paths):
    """Opened as `mlflow ui --backend-store-uri sqlite:///mlflow.db` started in the sweep's directory
    opens it (spelled out absolute: in one process MLflow caches a store per URI string, and the
    relative URI was first opened elsewhere by another test)."""
    from mlflow import MlflowClient

    _, _, summary = interrupted_then_resumed
    base, _ = sweep_paths
    assert (base / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{base.resolve() / 'mlflow.db'}")
    parent = client.get_run(summary.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["space.train.lr"] == "choice[1e-09]"
    assert parent.data.tags["centernet_ray.command"].startswith(f"centernet-ray tune {CONFIG} ")
    assert parent.data.tags["mlflow.source.name"].startswith("centernet-ray tune tiny_tune data.root=shapes ")
    assert summary.best.trial_id in parent.data.tags["mlflow.note.content"]  # the trial table as its description
    assert parent.data.metrics["best_AP50"] == pytest.approx(summary.best.metrics["AP50"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.txt", "sweep_summary.json", "best_config.yaml", "search_space.yaml"} <= artifacts
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["centernet_ray.trial_id"] for r in children) == sorted(t.trial_id for t in summary.trials)
    for run in children:
        trial = next(t for t in summary.trials if t.trial_id == run.data.tags["centernet_ray.trial_id"])
        assert run.info.run_id == trial.mlflow_run_id
        assert float(run.data.params["loss.alpha"]) == pytest.approx(trial.params["loss.alpha"])
        assert float(run.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
        history = client.get_metric_history(run.info.run_id, "val/AP50")
        assert len(history) == trial.epochs  # one value per evaluation
        assert run.info.status == "FINISHED" and run.data.tags["centernet_ray.tune_status"] == trial.status
        if trial is summary.trials[0]:  # run by the interrupted command; the others by the resume (pytest)
            assert run.data.tags["mlflow.source.name"] == parent.data.tags["mlflow.source.name"]
        assert run.info.artifact_uri.startswith(str(base.resolve())), run.info.artifact_uri
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in artifacts  # the checkpoint and the pictures come with the last epoch:
        assert ("checkpoint" in artifacts) == (trial.status == "finished")  # not from a stopped trial


def test_the_best_config_yaml_trains_unchanged_with_centernet_ray_train(interrupted_then_resumed, tmp_path):
    from centernet_ray.cli import main

    _, _, summary = interrupted_then_resumed
    best = load_config(summary.best_config_path)
    assert best.train.run_name == "tiny-sweep-best" and best.train.lr == pytest.approx(3e-3)
    out = tmp_path / "train.json"
    assert main(["train", summary.best_config_path, "--summary-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["epochs"] == 2 and result["AP50"] >= 0 and result["mlflow_run_id"] not in (
        t.mlflow_run_id for t in summary.trials)


@pytest.mark.timeout(400)  # a sweep on workers this Ray cannot start, not refused, would wait for ever: fail
def test_a_sweep_whose_every_trial_fails_says_why_and_exits_1(ray_session, shapes_dataset, tmp_path, capsys,
                                                              monkeypatch):
    """Its one trial draws a batch the 24 training images cannot fill: the trial fails in its own
    actor, after the sweep's ingest. The summary names the trial, its error's message and Tune's
    error.txt (which exists), the command exits 1 saying every trial failed, and the sweep's MLflow
    run ends FAILED, not FINISHED."""
    from mlflow import MlflowClient

    from centernet_ray.cli import main

    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text("train.batch_size: {choice: [64]}\n")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "summary.json"
    sweep = ["tune", str(CONFIG), f"data.root={shapes_dataset}", f"data.parquet_dir={tmp_path / 'parquet'}",
             "train.storage_path=runs", "tune.name=failing", "tune.num_samples=1", "tune.include_default=false",
             f"tracking.tracking_uri={store}", "--search-space", str(space), "--summary-json", str(out)]
    # what every trial would fail on alike is refused before the ingest, as `train` refuses it
    assert main([*sweep, "model.width=1.0", "model.pretrained=/nowhere/weights.pth"]) == 2  # ImageNet's width
    assert "error: model.pretrained: no weights file /nowhere/weights.pth here" in capsys.readouterr().err
    assert not (tmp_path / "parquet").exists()
    if not ray.cluster_resources().get("GPU"):  # and trials whose workers this Ray has no GPUs for
        assert main([*sweep, "train.use_gpu=true"]) == 2
        assert ("error: 1 training worker (train.num_workers=1, train.use_gpu=true), the preprocessing and the "
                "trial's driver need 1 GPU, but the Ray this command started has 0 GPUs: set train.use_gpu=false"
                in capsys.readouterr().err)
        assert not (tmp_path / "parquet").exists()
    from centernet_ray.errors import UserInputError
    from centernet_ray.ray_tune.search_space import load_search_space
    from centernet_ray.ray_tune.sweep import check_pretrained_files, check_trial_workers_fit

    searched = tmp_path / "pretrained.yaml"
    without_default = load_config(CONFIG, ["tune.include_default=false", "model.width=1.0"])
    searched.write_text("model.pretrained: {choice: [null, /nowhere/weights.pth]}\n")  # so is a value a trial may draw
    with pytest.raises(UserInputError, match="no weights file /nowhere/weights.pth here"):
        check_pretrained_files(without_default, load_search_space(searched, without_default))
    searched.write_text("model.pretrained: {choice: [null]}\n")  # and a base value no trial trains from is not
    check_pretrained_files(with_overrides(without_default.to_dict(), ["model.pretrained=/nowhere/weights.pth"]),
                           load_search_space(searched, without_default))
    cpus = int(ray.cluster_resources()["CPU"])  # a number of workers the space lists, which no trial could start with
    workers = tmp_path / "workers.yaml"
    workers.write_text(f"train.num_workers: {{choice: [1, {cpus}]}}\n")
    base = load_config(CONFIG)
    with pytest.raises(UserInputError, match=f"^{cpus} training workers \\(train.num_workers={cpus}, "
                                             f"train.use_gpu=false\\), the preprocessing and the trial's driver need "
                                             f"{cpus + 1.1:g} CPUs"):
        check_trial_workers_fit(base, load_search_space(workers, base))
    workers.write_text(f"train.num_workers: {{choice: [1, {cpus - 2}]}}\n")  # the most leaving a task and the driver room
    check_trial_workers_fit(base, load_search_space(workers, base))
    code = main(sweep)
    captured = capsys.readouterr()
    assert code == 1 and "error: every trial of sweep failing failed" in captured.err, captured.err[-2000:]
    trial = json.loads(out.read_text())["trials"][0]
    assert trial["status"] == "error" and Path(trial["error_file"]).is_file(), trial
    assert (f"failed:      trial {trial['trial_id']}: centernet_ray.errors.UserInputError: 24 training images cannot "
            f"fill one global batch of 64 (train.batch_size x train.num_workers)  (traceback: {trial['error_file']})"
            ) in captured.out, captured.out[-3000:]
    client = MlflowClient(store)
    [sweep] = client.search_runs([client.get_experiment_by_name(load_config(CONFIG).tracking.experiment).experiment_id])
    assert sweep.info.status == "FAILED" and sweep.data.metrics["num_errors"] == 1
