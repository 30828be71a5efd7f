"""The training job's driver: data, TorchTrainer, run naming/resume, final summary."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import ray
import yaml
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, Result, RunConfig
from ray.train import UserCallback
from ray.train.torch import TorchTrainer

from centernet_ray import lease, ray_compat, ray_runtime, storage
from centernet_ray.checkpoint import DATA_LOCATIONS_FILE, RUN_CONFIG_FILE, changed_settings
from centernet_ray.config import Config, ConfigError, check_batch_norm_batch, config_from_dict
from centernet_ray.data.identity import changed_dataset, dataset_record, given_data_locations
from centernet_ray.data.sources import split_sources
from centernet_ray.errors import UserInputError, worker_user_error
from centernet_ray.evaluation import STAT_NAMES
from centernet_ray.ray_data.ingest import ingest_splits
from centernet_ray.ray_data.pipeline import CenterNetDataConfig, EpochClock, PipelineReport, training_datasets
from centernet_ray.ray_runtime import (warn_if_node_local, warn_if_node_local_tracking,
                                      warn_if_storage_in_job_working_dir)
from centernet_ray.ray_train.loop import (CHECKPOINT_SCORE, DatasetFacts, LoopInputs, WorkerCallback,
                                         train_loop_per_worker)
from centernet_ray.ray_train.preflight import check_pretrained_file, check_workers_fit, scaling_config
from centernet_ray.tracking import (DatasetInput, command_line, describe_run, end_running_launch_runs,
                                   ensure_experiment, run_tags)
from centernet_ray.training.budget import resumed_plan, run_finished

log = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """Training stopped before its last epoch (Ctrl+C): rerunning the same command resumes the run
    from its latest checkpoint."""


@dataclass
class TrainSummary:
    stats: dict[str, float]
    checkpoint: str | None
    mlflow_run_id: str | None
    wall_seconds: float
    epochs: int
    dropped_rows: dict[str, int]
    promotion: str | None = None  # with tracking.registered_model: what the registry did and why
    # what was reported with ``checkpoint`` (its epoch, its AP): the best by its own AP, maybe not the last
    checkpoint_metrics: dict[str, Any] = field(default_factory=dict)
    trained: bool = True  # False: a finished run's rerun, answered from its records (``finished_run``)

    def to_json(self) -> dict[str, Any]:
        return {**self.stats, "checkpoint": self.checkpoint, "mlflow_run_id": self.mlflow_run_id,
                "wall_seconds": round(self.wall_seconds, 2), "trained": self.trained, "epochs": self.epochs,
                "dropped_rows": self.dropped_rows,
                "promotion": self.promotion, "checkpoint_epoch": self.checkpoint_metrics.get("epoch"),
                "checkpoint_AP": self.checkpoint_metrics.get("AP")}

    def failure(self) -> str | None:
        """What failed, for the command's exit status (as ``SweepSummary.failure``): nothing, since a
        run that fails raises instead of returning a summary."""
        return None

    def best_is_not_the_last(self) -> str | None:
        """When the checkpoint named is not the last epoch's (whose evaluation the stats are): which
        one it is, in words; else None."""
        epoch, ap = self.checkpoint_metrics.get("epoch"), self.checkpoint_metrics.get("AP")
        if epoch is None or ap is None or int(epoch) == self.epochs:
            return None
        return f"the best by its own AP: epoch {int(epoch)}, AP {float(ap):.4f} (the stats are epoch {self.epochs}'s)"


def default_run_name(config: Config) -> str:
    return config.train.run_name or f"centernet-{config.model.backbone}"


def checkpoint_config() -> CheckpointConfig:
    """The checkpoints kept on disk: the two best by the AP of their own weights, and the latest
    (Ray Train keeps the latest whatever its score; a resume starts from it)."""
    return CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=CHECKPOINT_SCORE, checkpoint_score_order="max")


def build_trainer(config: Config, *, callbacks: list[UserCallback] | None = None, worker_callbacks: list[WorkerCallback] | None = None,
                  threads_per_worker: int | None = None, mlflow_parent_run_id: str | None = None,
                  mlflow_tags: dict[str, str] | None = None, source: str | None = None,
                  started_at: float | None = None, data_locations: dict[str, str] | None = None,
                  launch: str, in_a_sweep: bool = False, reading: lease.Lease | None = None
                  ) -> tuple[TorchTrainer, Any]:
    """A ``TorchTrainer`` for ``config`` (data ingested first), plus the preprocessing drop report.

    ``callbacks`` are Ray Train ``UserCallback``s (a Tune trial passes its report callback);
    ``worker_callbacks`` run inside every worker's loop; ``threads_per_worker`` defaults to the
    cores divided among the workers; ``mlflow_parent_run_id`` nests the run's MLflow run under a
    sweep's run; ``source`` is the command shown as the run's source (default: this process's);
    ``started_at`` (``time.time()``, default now) is when ``train.time_limit`` started counting;
    ``data_locations``: the dataset's locations as the command gave them (``given_data_locations``),
    default ``config``'s (a sweep's trials get the sweep command's: theirs are made absolute where
    the sweep runs, which a resumed sweep may not); ``launch`` names this start of the job in MLflow
    (``new_launch()``; see ``RunTracker``); ``in_a_sweep``: a sweep's trial, which trains on the
    sweep's ingest even when the image files changed since (``ingest_coco``'s ``images_changed_ok``);
    ``reading``: the lease of the command that trains, which marks the ingest as read (see ``ingest_coco``)."""
    started_at = time.time() if started_at is None else started_at
    data_locations = given_data_locations(config) if data_locations is None else data_locations
    # Paths and the MLflow store are resolved here, in the user's directory: the workers' working
    # directory is Ray's session folder.
    config = storage.with_absolute_paths(config)
    check_batch_norm_batch(config)
    check_workers_fit(config)
    check_resumable(config, data_locations)  # all before the ingest, which can take long
    check_pretrained_file(config)
    ingested = ingest_splits(config.data, label_selector=config.cluster.data_selector(), images_changed_ok=in_a_sweep,
                             reading=reading)
    sources = split_sources(config.data)
    warn_if_node_local(ingested["train"].output, "the ingested dataset (data.parquet_dir)")
    warn_if_node_local(storage.default_storage_path(config), "train.storage_path")
    warn_if_storage_in_job_working_dir(storage.default_storage_path(config))
    warn_if_node_local_tracking(config.tracking.tracking_uri)
    ensure_experiment(config)
    dataset_facts = {"fingerprint": ingested["train"].fingerprint, "train_images": ingested["train"].rows,
                     "val_images": ingested["val"].rows, "classes": len(ingested["train"].class_names),
                     "val_fingerprint": ingested["val"].fingerprint}
    tags = {**run_tags(config, source or command_line(), dataset_facts), **(mlflow_tags or {})}
    dataset_inputs = [DatasetInput(split, sources[split].annotations, ingested[split].fingerprint, context)
                for split, context in (("train", "training"), ("val", "validation"))]
    train_rows = ingested["train"].rows
    global_batch = config.train.batch_size * config.train.num_workers
    steps_per_epoch = max(1, train_rows // config.train.num_workers // config.train.batch_size)
    if train_rows < global_batch:
        raise UserInputError(f"{train_rows} training images cannot fill one global batch of {global_batch} "
                             "(train.batch_size x train.num_workers)")
    report, clock = PipelineReport.remote(), EpochClock.remote()
    datasets = training_datasets(ingested["train"].output, ingested["val"].output, config, report=report, clock=clock)
    facts = DatasetFacts(num_classes=len(ingested["train"].class_names), class_names=ingested["train"].class_names,
                         category_ids=ingested["train"].category_ids, steps_per_epoch=steps_per_epoch,
                         val_annotations=sources["val"].annotations)
    inputs = LoopInputs(config=config, dataset=facts, run_name=default_run_name(config), clock=clock,
                        threads_per_worker=threads_per_worker or max(1, (os.cpu_count() or 1) // config.train.num_workers),
                        mlflow_parent_run_id=mlflow_parent_run_id, mlflow_tags=tags, mlflow_datasets=dataset_inputs,
                        mlflow_launch=launch,
                        callbacks=list(worker_callbacks or []), eval_images=ingested["val"].rows,
                        dataset_record=dataset_record(config.data, data_locations,
                                                      {split: result.annotations_sha256 for split, result in ingested.items()}),
                        deadline=None if config.train.time_limit is None else started_at + config.train.time_limit)
    if inputs.deadline is not None:
        log.info("time limit: %.0f s, %.0f s left for training after start-up and data (at most %d epochs)",
                 config.train.time_limit, inputs.deadline - time.time(), config.train.epochs)
    run = RunConfig(
        name=default_run_name(config), storage_path=storage.default_storage_path(config),
        checkpoint_config=checkpoint_config(),
        failure_config=FailureConfig(max_failures=config.train.max_failures),
        callbacks=callbacks or None,
    )
    trainer = TorchTrainer(functools.partial(train_loop_per_worker, inputs), scaling_config=scaling_config(config),
                           datasets=datasets, dataset_config=CenterNetDataConfig(config.cluster.data_selector()),
                           run_config=run)
    return trainer, report


def check_resumable(config: Config, data_locations: dict[str, str]) -> None:
    """Refuse to resume the run of this name (``train.storage_path``/``train.run_name``) with
    settings it was not trained with (``checkpoint.changed_settings``) or on another dataset
    (``data.identity.changed_dataset``: given elsewhere, or annotation files with other content;
    ``data_locations``: ``given_data_locations`` of the command's config): the rerun would report
    or continue the old run as if it were the new one. ``config`` with absolute paths. Runs whose
    checkpoints predate the files beside them are not checked (on what those lack)."""
    run_dir = run_folder(config)
    latest = ray_compat.train_resume_checkpoint(run_dir)
    if latest is None:
        return
    path = storage.join(run_dir, latest, RUN_CONFIG_FILE)
    if not storage.exists(path):
        return
    try:
        trained = config_from_dict(yaml.safe_load(storage.read_bytes(path)))
    except ConfigError as exc:  # written by another version of the schema
        log.warning("not comparing with the settings of the run in %s (%s)", run_dir, exc)
        return
    changed = changed_settings(trained, config)
    record_path = storage.join(run_dir, latest, DATA_LOCATIONS_FILE)
    if storage.exists(record_path):
        changed += changed_dataset(json.loads(storage.read_bytes(record_path)), data_locations, config.data)
    if changed:
        raise UserInputError(
            f"{run_dir} holds a run of this name trained with other settings or data ({'; '.join(changed[:6])}"
            f"{'; ...' if len(changed) > 6 else ''}): a rerun resumes a run as it was. Give the new settings a "
            f"run of their own (train.run_name=...), or delete {run_dir} to start this name over. A resume may "
            "change train.epochs, train.time_limit, evaluation, checkpointing and data-loading settings, not the "
            "dataset.")


def _best_checkpoint(result: Result) -> tuple[Checkpoint | None, dict[str, Any]]:
    """(the kept checkpoint with the best :data:`CHECKPOINT_SCORE`, the metrics reported with it),
    else the latest (checkpoints of a run written before the score existed have none)."""
    return _best_by_score(result.best_checkpoints or [], (result.checkpoint, result.metrics or {}))


def _best_by_score(candidates: list[tuple[Any, dict[str, Any]]],
                   fallback: tuple[Any, dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """Of (checkpoint, its metrics) pairs, the one with the best :data:`CHECKPOINT_SCORE` (the first
    of a tie), else ``fallback``."""
    scored = [pair for pair in candidates if CHECKPOINT_SCORE in pair[1]]
    return max(scored, key=lambda pair: pair[1][CHECKPOINT_SCORE]) if scored else fallback


def best_recorded_checkpoint(kept: list[tuple[str, dict[str, Any]]],
                             latest: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Of Ray Train's records of the kept checkpoints (``ray_compat.train_checkpoint_records``), (the
    folder name, the metrics) of the one with the best :data:`CHECKPOINT_SCORE`, else ``latest``:
    the records' counterpart of ``_best_checkpoint``."""
    return _best_by_score(kept, latest)


def finished_run(config: Config, started: float, data_locations: dict[str, str]) -> TrainSummary | None:
    """The answer to a rerun of a finished run: its summary when Ray Train's records of the run of
    this name (``train.storage_path``/``train.run_name``) say it has nothing left to train
    (``budget.run_finished``), else None. No ingest (the annotation files are read once, to compare
    them with the run's: ``check_resumable``), no workers (no GPU nodes to scale up for it), no Ray
    needed, nothing logged to the MLflow run; with ``tracking.registered_model`` its
    checkpoint is registered and promoted as after training (``_register``). ``config`` with
    absolute paths; ``started``: ``time.perf_counter()`` when the rerun started; ``data_locations``:
    the dataset as the command gave it (``check_resumable``)."""
    run_dir = run_folder(config)
    latest, kept = ray_compat.train_checkpoint_records(run_dir)
    if latest is None:
        return None
    name, metrics = latest
    epochs = int(metrics.get("epoch", 0))
    if not run_finished(epochs, metrics, config.train.epochs):
        return None
    check_resumable(config, data_locations)  # a rerun with other settings is refused, finished or not
    longer = ("it finished at its time budget's plan: a longer run needs its own train.run_name"
              if resumed_plan(metrics) else "a larger train.epochs trains it on")
    log.info("training run %s finished after epoch %d (%s): reported from its checkpoints, not retrained; %s",
             default_run_name(config), epochs, run_dir, longer)
    best, best_metrics = best_recorded_checkpoint(kept, latest)
    summary = TrainSummary({stat: float(metrics.get(stat, math.nan)) for stat in STAT_NAMES},
                           storage.join(run_dir, best), metrics.get("mlflow_run_id"),
                           time.perf_counter() - started, epochs, {}, checkpoint_metrics=best_metrics, trained=False)
    _register(config, summary)
    return summary


def run_folder(config: Config) -> str:
    """Where Ray Train keeps the run of this name: ``train.storage_path``/``train.run_name``."""
    return storage.join(storage.default_storage_path(config), default_run_name(config))


def _register(config: Config, summary: TrainSummary) -> None:
    """With ``tracking.registered_model``: export, check, register and maybe promote the run's
    checkpoint (``promotion.export_and_promote``); what the registry did goes to ``summary``.
    ``config`` with absolute paths."""
    if not (config.tracking.registered_model and summary.mlflow_run_id):
        return
    from centernet_ray.promotion import export_and_promote

    try:  # the run is trained and tracked whatever the registry says
        summary.promotion = export_and_promote(config, summary.mlflow_run_id, summary.stats["AP"]).describe()
    except Exception as exc:  # the model registry unreachable or refusing
        log.exception("registering run %s failed", summary.mlflow_run_id)
        summary.promotion = f"not registered: {type(exc).__name__}: {exc}"


def run_training(config: Config, worker_callbacks: list[WorkerCallback] | None = None,
                 source: str | None = None, started_at: float | None = None) -> TrainSummary:
    """Train to the end (resuming a run of the same name and storage path) and summarise it; the
    summary becomes the MLflow run's description. A finished run is summarised, not trained again
    (``finished_run``); otherwise Ray is started or joined (``ray_runtime.init_ray``) once the batch
    is known to train. ``source``: the command, for the run's source; ``started_at``: when
    ``train.time_limit`` started counting (the CLI: when the command started)."""
    started, launch = time.perf_counter(), new_launch()
    absolute = storage.with_absolute_paths(config)
    folder = run_folder(absolute)
    # an unknown bucket, or an endpoint that does not answer: one line (Ray Train's writes there would end in a
    # traceback); a sweep's trials are checked by the sweep
    storage.require_bucket(folder)
    # held before the records are read: a run another command trains is not finished, whatever they say yet
    with lease.held(folder, what=f"training run {default_run_name(config)} ({folder})",
                    instead="Give this run its own train.run_name.") as held:
        finished = finished_run(absolute, started, given_data_locations(config))
        if finished is not None:
            return finished
        check_batch_norm_batch(config)  # before Ray starts: answered at once
        storage.require_tracking_server(storage.tracking_uri(config.tracking.tracking_uri))
        # the synthetic shapes, when used, drawn before Ray: its processes starting took a core from the
        # drawing threads (the demo's 12,200 images: 26-34 s after Ray's start, 25-29 s before it)
        split_sources(config.data)
        ray_runtime.init_ray()
        trainer, report = build_trainer(config, worker_callbacks=worker_callbacks, source=source,
                                        started_at=started_at, launch=launch, reading=held)
        held.confirm()
        return _train_and_summarise(trainer, report, config, absolute, launch, started, source)


def _train_and_summarise(trainer: TorchTrainer, report: Any, config: Config, absolute: Config, launch: str,
                         started: float, source: str | None) -> TrainSummary:
    """``run_training``'s fit and summary (``absolute``: ``config`` with absolute paths)."""
    previous_handler = signal.getsignal(signal.SIGINT)  # fit() installs Ray Train's Ctrl+C handler for good
    try:
        result = fit(trainer, config, launch)
    except SystemExit as exc:  # that handler aborts the run, then exits from inside fit()
        raise _interrupted(config, launch) from exc
    finally:
        if previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous_handler)
    metrics = result.metrics or {}
    checkpoint, checkpoint_metrics = _best_checkpoint(result)
    stats = {name: float(metrics.get(name, math.nan)) for name in STAT_NAMES}
    dropped = ray.get(report.get.remote())["counts"]
    where = None
    if checkpoint is not None:  # named as a rerun names it: Ray's Checkpoint.path drops a storage URI's scheme
        where = storage.join(run_folder(absolute), PurePosixPath(checkpoint.path).name)
    summary = TrainSummary(stats, where, metrics.get("mlflow_run_id"), time.perf_counter() - started,
                           int(metrics.get("epoch", 0)), dropped, checkpoint_metrics=checkpoint_metrics)
    _register(absolute, summary)
    if summary.mlflow_run_id:
        describe_run(config, summary.mlflow_run_id, summary_markdown(summary, config, source or command_line()))
    return summary


def new_launch() -> str:
    """A new id for one start of a training job (``build_trainer``'s ``launch``)."""
    return uuid.uuid4().hex


def fit(trainer: TorchTrainer, config: Config, launch: str) -> Result:
    """``trainer.fit()``; a failed run is raised, its MLflow run marked FAILED first (a worker that
    died, killed or out of memory, could not end it)."""
    try:
        result = trainer.fit()
        error = result.error
    except Exception as exc:
        error = exc
    if error is not None:
        end_running_launch_runs(config, launch, "FAILED")
        raise worker_user_error(error) or error
    return result


def _interrupted(config: Config, launch: str) -> TrainingInterrupted:
    """What an interrupted run left, said to the user: its latest checkpoint, from which rerunning the
    command resumes; its MLflow run is marked KILLED rather than left running in the UI."""
    run_dir = run_folder(config)
    try:
        latest = ray_compat.train_resume_checkpoint(run_dir)
    except OSError as exc:  # object storage unreachable: say so rather than guess
        log.warning("could not read the run's checkpoint records in %s: %s", run_dir, exc)
        latest = None
    run_id = end_running_launch_runs(config, launch, "KILLED")
    where = (f"its latest checkpoint is epoch {int(latest.rsplit('_', 1)[1])} in {storage.join(run_dir, latest)}: "
             "rerun the same command to resume from it" if latest else
             f"it stopped before its first checkpoint was recorded in {run_dir}: rerunning the same command "
             "starts it again")
    mlflow = f"; MLflow run {run_id} marked KILLED" if run_id else ""
    return TrainingInterrupted(f"training run {default_run_name(config)} interrupted: {where}{mlflow}")


def format_summary(summary: TrainSummary) -> str:
    lines = ["", "training summary", "-" * 40]
    lines += [f"{name:>8}  {summary.stats[name]:.4f}" for name in STAT_NAMES]
    wall = f"{summary.wall_seconds:.1f} s" + ("" if summary.trained else " (not trained again: the finished run's records)")
    lines += ["-" * 40, f"{'epochs':>8}  {summary.epochs}", f"{'wall':>8}  {wall}", f"{'ckpt':>8}  {summary.checkpoint}"]
    which = summary.best_is_not_the_last()
    lines += [f"{'':>8}  {which}"] if which else []
    lines.append(f"{'mlflow':>8}  {summary.mlflow_run_id}")
    if summary.dropped_rows:
        lines.append(f"{'dropped':>8}  {summary.dropped_rows}")
    if summary.promotion:
        lines.append(f"{'registry':>8}  {summary.promotion}")
    return "\n".join(lines)


def summary_markdown(summary: TrainSummary, config: Config, command: str) -> str:
    """The summary as the MLflow run's description (Markdown: a table of the COCO stats)."""
    lines = [f"`{command}`", "",
             f"**{config.model.backbone}** trained {summary.epochs} epoch(s) in {summary.wall_seconds:.0f} s "
             f"({config.train.num_workers} worker(s), global batch {config.train.batch_size * config.train.num_workers}).",
             "", "| stat | value |", "|---|---|"]
    lines += [f"| {name} | {summary.stats[name]:.4f} |" for name in STAT_NAMES]
    which = summary.best_is_not_the_last()
    lines += ["", f"Checkpoint: `{summary.checkpoint}`" + (f" ({which})" if which else "")]
    if summary.dropped_rows:
        lines.append(f"Dropped by preprocessing: {summary.dropped_rows}")
    if summary.promotion:
        lines.append(f"Registry: {summary.promotion}")
    return "\n".join(lines)
