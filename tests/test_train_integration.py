"""The training job on a real local Ray: 2-worker CPU DDP, failure + resume, rerun, Ctrl+C, checkpoints."""

import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from centernet_ray.checkpoint import DATA_LOCATIONS_FILE, load_checkpoint, model_from_checkpoint
from centernet_ray.config import load_config
from centernet_ray.data.identity import ANNOTATIONS_SHA256_KEYS
from centernet_ray.ray_train.loop import CHECKPOINT_SCORE, WorkerCallback, checkpoint_score

pytestmark = pytest.mark.integration


class EpochLog(WorkerCallback):
    """Appends "<rank> <epoch>" to a file at the start of every epoch every worker runs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def on_epoch_start(self, epoch: int, rank: int, resumed: bool) -> None:
        with open(self.path, "a") as handle:
            handle.write(f"{rank} {epoch}\n")


class FailOnce(WorkerCallback):
    """Rank 0 raises at the start of ``epoch`` unless the attempt resumed from a checkpoint."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, epoch: int, rank: int, resumed: bool) -> None:
        if epoch == self.epoch and rank == 0 and not resumed:
            raise RuntimeError(f"injected failure at epoch {epoch}")


class FailTheFirstAttempt(WorkerCallback):
    """Rank 0 raises at the start of epoch 0 of the run's first attempt (``marker`` records that it
    did), before any checkpoint: the next attempt starts from scratch."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def on_epoch_start(self, epoch: int, rank: int, resumed: bool) -> None:
        if epoch == 0 and rank == 0 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError("injected failure before the first checkpoint")


class Die(WorkerCallback):
    """Rank 0 ends its process at the start of epoch 0, as the kernel's OOM killer would: no Python
    code of the worker runs after it."""

    def on_epoch_start(self, epoch: int, rank: int, resumed: bool) -> None:
        if rank == 0:
            os._exit(1)


class CtrlC(WorkerCallback):
    """Rank 0 sends SIGINT to the driver (``pid``) at the start of ``epoch`` unless resumed, as Ctrl+C
    in the terminal does, once Ray Train has recorded the previous epoch's checkpoint in the run's
    snapshot (``snapshot``; it does so after the report, while the next epoch starts), then waits
    to be stopped."""

    def __init__(self, pid: int, epoch: int, snapshot: Path) -> None:
        self.pid, self.epoch, self.snapshot = pid, epoch, str(snapshot)

    def on_epoch_start(self, epoch: int, rank: int, resumed: bool) -> None:
        if epoch == self.epoch and rank == 0 and not resumed:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (os.path.exists(self.snapshot) and f"epoch_{epoch:04d}"
                                                       in open(self.snapshot).read()):
                time.sleep(0.2)
            os.kill(self.pid, signal.SIGINT)
            time.sleep(60)


class SecondCommand(WorkerCallback):
    """Rank 0, at the start of ``epoch``, runs ``centernet-ray train CONFIG`` (``config_file``) as a
    second terminal would, on the run being trained, and writes its exit status and stderr to ``out``."""

    def __init__(self, config_file: Path, epoch: int, out: Path) -> None:
        self.config_file, self.epoch, self.out = str(config_file), epoch, str(out)

    def on_epoch_start(self, epoch: int, rank: int, resumed: bool) -> None:
        if epoch == self.epoch and rank == 0 and not resumed:
            import contextlib
            import io

            from centernet_ray.cli import main

            with contextlib.redirect_stderr(io.StringIO()) as stderr:
                status = main(["train", self.config_file])
            Path(self.out).write_text(f"{status}\n{stderr.getvalue()}")


@pytest.fixture(autouse=True, scope="module")
def callbacks_travel_by_value():
    """The workers cannot import this test module: ship its callback classes inside the pickle."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def tiny_config(shapes_dataset, tmp_path):
    return load_config(None, [
        f"data.root={shapes_dataset}", f"data.parquet_dir={tmp_path / 'parquet'}", "data.input_size=[64,64]",
        # tasks: the session's warm worker processes preprocess (an actor pool would start fresh ones
        # for every epoch of every attempt; the actor pool under DDP: test_jobs_integration.py)
        "data.preprocess_compute=tasks", "data.preprocess_max_actors=2", "data.preprocess_batch_size=8",
        "targets.max_objects=8",
        # a quarter-width ResNet-18 (0.8M parameters, not 11.5M): DDP's all-reduce, the steps and every
        # checkpoint written and read are what these tests exercise, not the network's size
        "model.width=0.25", "model.neck_channels=[32,32,32]", "model.head_conv=16", "train.num_workers=2",
        "train.batch_size=4",
        "train.epochs=2", "train.eval_every=1", "train.checkpoint_every=1", "train.lr=1e-3", "train.amp=bf16",
        f"train.storage_path={tmp_path / 'runs'}", "train.run_name=tiny", "train.max_failures=1",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.log_model=false",  # a torch.export per run that no test here reads: test_jobs_integration.py does
    ])


def test_two_worker_ddp_run_survives_a_killed_worker_resumes_and_reruns(ray_session, tiny_config, tmp_path):
    """Two failures: one before the first checkpoint, one after; one MLflow run for all three attempts."""
    from centernet_ray.config import with_overrides
    from centernet_ray.ray_train import job
    from centernet_ray.ray_train.job import run_training

    config = with_overrides(tiny_config.to_dict(), ["train.max_failures=2"])
    epoch_log = tmp_path / "epochs.txt"
    summary = run_training(config, [EpochLog(epoch_log), FailTheFirstAttempt(tmp_path / "failed"), FailOnce(1)])
    assert summary.epochs == 2 and not math.isnan(summary.stats["AP"]) and summary.mlflow_run_id
    rank0 = [int(line.split()[1]) for line in epoch_log.read_text().splitlines() if line.startswith("0 ")]
    # epoch 0 started again (no checkpoint yet), then epoch 1 failed once and reran from the
    # epoch-1 checkpoint: the finished epoch 0 was not repeated
    assert rank0 == [0, 0, 1, 1]

    state = load_checkpoint(summary.checkpoint)  # weights_only=True inside
    kept = json.loads((Path(summary.checkpoint) / DATA_LOCATIONS_FILE).read_text())  # what a rerun compares
    assert kept[ANNOTATIONS_SHA256_KEYS["val"]] == hashlib.sha256(
        Path(config.data.root, "annotations", "instances_val.json").read_bytes()).hexdigest()
    assert state["epoch"] in (1, 2) and state["class_names"] == ["circle", "rectangle", "triangle", "cross"]
    assert state["metrics"][CHECKPOINT_SCORE] == state["metrics"]["AP"]  # ranked by its own weights' AP
    restored = model_from_checkpoint(summary.checkpoint)
    assert isinstance(restored.model, torch.nn.Module)
    # the run's MLflow artifact is what a model is served from: the same weights, no optimizer state
    # (a resume reads the checkpoint in the storage path, which has it)
    import mlflow

    last = load_checkpoint(Path(summary.checkpoint).parent / "epoch_0002")  # the latest is kept beside the best
    assert last["optimizer"] is not None and last["epoch"] == 2
    served = load_checkpoint(mlflow.artifacts.download_artifacts(
        run_id=summary.mlflow_run_id, artifact_path="checkpoint/checkpoint.pt", dst_path=str(tmp_path / "artifact"),
        tracking_uri=config.tracking.tracking_uri))
    assert served["optimizer"] is None and served["epoch"] == 2
    assert all(torch.equal(served["model"][key], value) for key, value in last["model"].items())

    epoch_log.write_text("")
    with pytest.MonkeyPatch.context() as patch:  # a finished run is summarised from its records, not retrained:
        patch.setattr(job, "build_trainer", None)  # no ingest, no workers; registered when asked (the README's
        again = run_training(with_overrides(config.to_dict(), ["tracking.registered_model=ddp"]),  # way to a
                             [EpochLog(epoch_log)])  # first model version is this rerun)
    assert epoch_log.read_text() == ""
    assert again.mlflow_run_id == summary.mlflow_run_id and again.stats == pytest.approx(summary.stats, nan_ok=True)
    assert again.checkpoint == summary.checkpoint and again.epochs == 2
    assert again.promotion.startswith("ddp version 1: "), again.promotion
    from mlflow import MlflowClient

    client = MlflowClient(config.tracking.tracking_uri)  # the failed attempts' run, continued, ended well
    runs = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])
    assert [(run.info.run_id, run.info.status) for run in runs] == [(summary.mlflow_run_id, "FINISHED")]

    from centernet_ray.errors import UserInputError
    from centernet_ray.lease import held

    with held(str(Path(summary.checkpoint).parent), what="the run", instead="Wait."):  # another command trains it
        with pytest.raises(UserInputError, match=r"^training run \S+ \(.*\) is in use by another command: "):
            run_training(config)  # not answered as finished from its records meanwhile
    longer = run_training(with_overrides(config.to_dict(), ["train.epochs=3"]), [EpochLog(epoch_log)])
    assert longer.epochs == 3 and sorted(epoch_log.read_text().splitlines()) == ["0 2", "1 2"]  # it may train longer
    changed = with_overrides(config.to_dict(), ["loss.alpha=3", "train.lr=0.002"])
    with pytest.raises(UserInputError, match=r"other settings or data \(loss.alpha: 2.0 -> 3.0; train.lr: 0.001 -> 0.002\)"):
        run_training(changed)  # refused before the ingest: it would have reported the old run as this one
    with pytest.raises(UserInputError, match=r"other settings or data \(data.root: '[^']+' -> '/elsewhere/shapes'\)"):
        run_training(with_overrides(config.to_dict(), ["data.root=/elsewhere/shapes"]))  # nor on another dataset


class RefuseWhatItWasGiven(WorkerCallback):
    """Rank 0 raises a ``UserInputError`` at the start of epoch 0, as a worker does on what the user
    gave it."""

    def on_epoch_start(self, epoch: int, rank: int, resumed: bool) -> None:
        from centernet_ray.errors import UserInputError

        if rank == 0:
            raise UserInputError("injected: what the user gave cannot be trained on")


@pytest.mark.parametrize("failure, error", [(RefuseWhatItWasGiven(), "^injected: what the user gave cannot be "
                                                                    "trained on$"),
                                            (Die(), "health check failed|died")], ids=["raises", "process_dies"])
def test_a_failed_run_ends_failed_in_mlflow_not_running(ray_session, tiny_config, tmp_path, failure, error):
    """No retries left: the run's MLflow run is marked FAILED, by rank 0 when the loop raises and by
    the driver when the worker's process is gone. A UserInputError a worker raised is raised as
    itself (the CLI's one-line error), not inside Ray Train's error of every rank."""
    from mlflow import MlflowClient

    from centernet_ray.config import with_overrides
    from centernet_ray.ray_train.job import run_training

    config = with_overrides(tiny_config.to_dict(), ["train.num_workers=1", "train.max_failures=0",
                                                    "train.run_name=fails"])
    import ray.train

    from centernet_ray.errors import UserInputError

    raised = UserInputError if isinstance(failure, RefuseWhatItWasGiven) else ray.train.TrainingFailedError
    with pytest.raises(raised, match=error):  # the worker's failure, not a setup error
        run_training(config, [failure])
    client = MlflowClient(config.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])
    assert [(run.info.run_name, run.info.status) for run in runs] == [("fails", "FAILED")]


def _report_epochs_of_ap(aps: list[float | None]) -> None:
    """A train function that reports one checkpointed epoch per AP (None: not evaluated), scored as
    the training loop scores its checkpoints."""
    import tempfile

    import ray.train

    for epoch, ap in enumerate(aps, start=1):
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, "weights.txt").write_text(str(epoch))
            metrics = {"epoch": epoch} | ({} if ap is None else {"AP": ap})
            metrics[CHECKPOINT_SCORE] = checkpoint_score(metrics)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"epoch_{epoch:04d}")


def test_the_best_checkpoint_by_its_own_ap_is_kept_beside_the_latest(ray_session, tmp_path):
    """APs 0.5, 0.3, then an epoch not evaluated, then 0.2: the job's checkpoint config keeps the two
    best (epochs 1 and 2) and the latest (4), and names epoch 1 the best. Ranked by the running best
    AP (0.5 from epoch 1 on), Ray kept the newest of the tie, epochs 3 and 4, and the best was lost."""
    import functools

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from centernet_ray import ray_compat
    from centernet_ray.ray_train.job import _best_checkpoint, best_recorded_checkpoint, checkpoint_config

    trainer = TorchTrainer(functools.partial(_report_epochs_of_ap, [0.5, 0.3, None, 0.2]),
                           scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="kept", storage_path=str(tmp_path),
                                                checkpoint_config=checkpoint_config()))
    result = trainer.fit()
    assert sorted(path.name for path in (tmp_path / "kept").glob("epoch_*")) == ["epoch_0001", "epoch_0002", "epoch_0004"]
    best, reported = _best_checkpoint(result)
    assert Path(best.path).name == "epoch_0001" and reported["AP"] == 0.5  # what the run's summary names
    # ...while a rerun resumes from the latest, which an interrupted run's message names
    assert ray_compat.train_resume_checkpoint(str(tmp_path / "kept")) == "epoch_0004"
    latest, kept = ray_compat.train_checkpoint_records(str(tmp_path / "kept"))  # what a finished run's rerun reads
    assert latest[0] == "epoch_0004" and latest[1]["epoch"] == 4 and sorted(name for name, _ in kept) == [
        "epoch_0001", "epoch_0002", "epoch_0004"]
    recorded, recorded_metrics = best_recorded_checkpoint(kept, latest)
    assert recorded == "epoch_0001" and (recorded_metrics["epoch"], recorded_metrics["AP"]) == (1, 0.5)


def test_ctrl_c_stops_the_run_says_how_to_resume_and_the_rerun_resumes_it(ray_session, tiny_config, tmp_path):
    """Ctrl+C in the second epoch: Ray Train aborts the run (and exits from inside ``fit``); the job
    says where its latest checkpoint is and marks its MLflow run KILLED; the same command again
    trains the second epoch only, into the same MLflow run, which ends FINISHED. The same command
    started in a second terminal while the run trains is refused, and Ctrl+C frees the run's folder."""
    from mlflow import MlflowClient

    from centernet_ray.config import with_overrides
    from centernet_ray import ray_compat
    from centernet_ray.lease import LEASE_FILE
    from centernet_ray.ray_train.job import TrainingInterrupted, run_training

    config = with_overrides(tiny_config.to_dict(), ["train.num_workers=1", "train.run_name=ctrl-c"])
    epoch_log = tmp_path / "epochs.txt"
    (tmp_path / "ctrl-c.yaml").write_text(config.to_yaml())
    second = tmp_path / "second.txt"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as interrupted:
        run_training(config, [EpochLog(epoch_log), SecondCommand(tmp_path / "ctrl-c.yaml", 1, second),
                              CtrlC(os.getpid(), 1, tmp_path / "runs" / "ctrl-c" / ray_compat.TRAIN_SNAPSHOT_FILE)])
    assert signal.getsignal(signal.SIGINT) is handler  # Ray Train's handler does not outlive the run
    status, message = second.read_text().split("\n", 1)
    assert status == "2" and message.startswith(f"error: training run ctrl-c ({tmp_path / 'runs' / 'ctrl-c'}) is in use "
                                                 f"by another command: `") and f"(pid {os.getpid()} on " in message
    assert "Wait for it to end, or give this run its own train.run_name." in message
    assert len(set(message.splitlines())) == 1, message  # one line (twice here: Ray Train's workers patch print to log it)
    assert not (tmp_path / "runs" / "ctrl-c" / LEASE_FILE).exists()
    checkpoint = tmp_path / "runs" / "ctrl-c" / "epoch_0001"
    assert f"its latest checkpoint is epoch 1 in {checkpoint}: rerun the same command to resume" in str(interrupted.value)
    client = MlflowClient(config.tracking.tracking_uri)
    run_id = str(interrupted.value).rsplit("MLflow run ", 1)[1].split()[0]
    assert client.get_run(run_id).info.status == "KILLED"

    epoch_log.write_text("")
    summary = run_training(config, [EpochLog(epoch_log)])
    assert epoch_log.read_text() == "0 1\n" and summary.epochs == 2  # epoch 1 (0-based) only, from the checkpoint
    assert summary.mlflow_run_id == run_id and client.get_run(run_id).info.status == "FINISHED"


def test_a_time_limit_trains_the_epochs_that_fit_with_the_schedule_fitted_to_them(ray_session, tiny_config, tmp_path):
    """train.time_limit on 2 DDP workers (rank 0's plan broadcast to both: they would hang on a
    mismatch) with the cache on: fewer epochs than the 500 allowed, the plan in MLflow and the
    checkpoint, and unless the run had to stop early, the cosine schedule ended. (The budget times
    23 steps, 8 epochs of 3, before it plans; on the fastest 2-core VM, after ~15 s of start-up, a
    limit of 60 s planned 21 epochs and the plan held (33 s; 80 s: 36 epochs, 53 s; 50 s: the plan
    came at the last epoch). On a slower VM the plan comes late or not at all and the run ends at
    the epoch that no longer fits: the checks of the plan then hold of that epoch.)"""
    import time

    from mlflow import MlflowClient

    from centernet_ray.config import with_overrides
    from centernet_ray.ray_train.job import run_training

    config = with_overrides(tiny_config.to_dict(), ["train.epochs=500", "train.time_limit=60", "train.eval_every=1000",
                                          "train.checkpoint_every=1000", "train.schedule=cosine",
                                          "train.warmup_epochs=0", "data.cache=true", "train.run_name=budget"])
    summary = run_training(config, started_at=time.time())
    client = MlflowClient(config.tracking.tracking_uri)
    planned = client.get_metric_history(summary.mlflow_run_id, "train/planned_epochs")
    assert 1 <= summary.epochs < 500 and planned[-1].value == summary.epochs, (summary.epochs, planned)
    state = load_checkpoint(summary.checkpoint)
    assert state["epoch"] == summary.epochs and state["metrics"]["planned_epochs"] == summary.epochs
    # the last epoch trained the steps planned for it, maybe fewer than an epoch's (the scheduler
    # steps once per optimizer step): 24 images over 2 workers, batch 4
    steps_per_epoch, last_steps = 3, state["metrics"]["planned_last_epoch_steps"]
    assert 1 <= last_steps <= steps_per_epoch
    assert state["scheduler"]["last_epoch"] == (summary.epochs - 1) * steps_per_epoch + last_steps, state["scheduler"]
    lr = client.get_metric_history(summary.mlflow_run_id, "train/lr")
    if len(planned) >= 2 and planned[-1].value == planned[-2].value:  # the plan held: the cosine reached its end
        assert lr[-1].value < 0.05 * config.train.lr, (lr[-1], planned)
    assert 0.0 <= summary.stats["AP50"] <= 1.0


def test_a_resumed_attempt_keeps_its_recorded_plan_until_its_budget_makes_its_own():
    """No Ray: the loop's schedule after a restart under a time budget with short epochs (3 steps:
    the budget is still timing steps after the first epoch). The checkpoint's plan (11 epochs, the
    last 2 of 3 steps) is kept, its LR schedule fitted, and not replaced by train.epochs."""
    import time as clock

    from centernet_ray.config import load_config
    from centernet_ray.ray_train.loop import DatasetFacts, LoopInputs, _Schedule
    from centernet_ray.training.engine import TrainingEngine

    config = load_config(None, ["model.width=0.25", "model.neck_channels=[16,16,16]", "model.head_conv=8",
                                "data.input_size=[64,64]", "train.epochs=100", "train.schedule=cosine",
                                "train.time_limit=1000", "train.eval_every=1000"])
    engine = TrainingEngine(config, num_classes=2, steps_per_epoch=3)
    facts = DatasetFacts(2, ["a", "b"], [1, 2], steps_per_epoch=3, val_annotations="")
    schedule = _Schedule(LoopInputs(config, facts, "run", deadline=clock.time() + 1000, eval_images=10), engine,
                         world=1, announce=False)
    schedule.resume({"epoch": 5.0, "planned_epochs": 11.0, "planned_last_epoch_steps": 2.0})
    assert (schedule.epochs, schedule.last_epoch_steps) == (11, 2) and engine.schedule.epochs == pytest.approx(32 / 3)
    assert not schedule.ends_after(5) and schedule.budget.timing  # epoch 6 trained, 6 stamps: no plan yet
    assert (schedule.epochs, schedule.last_epoch_steps) == (11, 2) and engine.schedule.epochs == pytest.approx(32 / 3)


@pytest.mark.timeout(240)  # without the refusal the commands wait for a labelled node for ever: fail, not hang
def test_node_pools_no_node_of_this_ray_carries_are_refused_before_the_ingest(ray_session, shapes_dataset, tmp_path,
                                                                             capsys, caplog, monkeypatch):
    """`cluster.node_pools=true` (`--node-pools` for `data ingest`) on a Ray this command started,
    whose one node has no pool label: its tasks and workers would be pending for ever, so the
    command says so in one line and exits 2, ingesting nothing. On a cluster joined, whose
    autoscaler may start a labelled node, it is a warning."""
    import logging

    from centernet_ray.cli import main
    from centernet_ray.ray_runtime import check_node_labels

    monkeypatch.chdir(tmp_path)
    assert main(["train", "demo", "cluster.node_pools=true", f"data.root={shapes_dataset}", "data.train_images=",
                 "data.train_annotations=", "data.val_images=", "data.val_annotations=", "data.parquet_dir=parquet",
                 "train.storage_path=runs", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    assert capsys.readouterr().err == (
        "error: no node of the Ray this command started has the label centernet-ray/pool=gpu that the training "
        "workers need (cluster.node_pools): set cluster.node_pools=false to run anywhere; or run on a cluster whose "
        "nodes carry it (RAY_ADDRESS, or `ray job submit`)\n")
    assert main(["data", "ingest", "--images", str(shapes_dataset / "images" / "train"), "--annotations",
                 str(shapes_dataset / "annotations" / "instances_train.json"), "--out", "parquet", "--node-pools"]) == 2
    assert capsys.readouterr().err.startswith("error: no node of the Ray this command started has the label "
                                              "centernet-ray/pool=cpu that the ingest's tasks need "
                                              "(cluster.node_pools): leave out --node-pools to run anywhere; ")
    assert not (tmp_path / "parquet").exists() and not (tmp_path / "runs").exists()
    # a Tune trial's driver is a Ray actor: its Ray was started elsewhere (the sweep's command checked it), and
    # on a cluster its autoscaler may yet start a labelled node
    checker = ray.remote(num_cpus=0)(LabelChecker).remote()
    assert ray.get(checker.check.remote()) == (
        "no node of this cluster has the label centernet-ray/pool=gpu that the training workers need "
        "(cluster.node_pools): they wait until one joins; set cluster.node_pools=false to run anywhere")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster joined
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="centernet_ray.ray_runtime"):
        check_node_labels({"centernet-ray/pool": "gpu"}, "the training workers")
    assert [record.getMessage() for record in caplog.records] == [
        "no node of this cluster has the label centernet-ray/pool=gpu that the training workers need "
        "(cluster.node_pools): they wait until one joins; set cluster.node_pools=false to run anywhere"]


class LabelChecker:
    """A Ray actor, as a Tune trial's driver is: what ``check_node_labels`` does there."""

    def check(self) -> str:
        """The warning logged instead of a refusal (or "no warning")."""
        import logging

        from centernet_ray.ray_runtime import check_node_labels

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                self.message = record.getMessage()

        keep = Keep()
        logging.getLogger("centernet_ray.ray_runtime").addHandler(keep)
        check_node_labels({"centernet-ray/pool": "gpu"}, "the training workers")
        return getattr(keep, "message", "no warning")
