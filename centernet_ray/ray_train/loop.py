"""The per-worker function run by ``TorchTrainer``: Ray glue around ``centernet_ray.training.engine``.

Shards in (``pipeline.shard_batches``), reports and checkpoints out (``ray.train.report``), MLflow
from rank 0. The step, the epoch and the evaluation pass are the engine's.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Imported here, when a worker unpickles its loop: the worker then waits ~1 s for Ray Train to set
# up the worker group, where importing MLflow (~1 s) at rank 0's first use was on the path to the
# first step.
import mlflow  # noqa: F401
import ray
import ray.train
import ray.train.torch
import torch

from centernet_ray import ray_compat, storage
from centernet_ray.checkpoint import (CHECKPOINT_FILE, DATA_LOCATIONS_FILE, RUN_CONFIG_FILE, checkpoint_state,
                                      inference_state, load_checkpoint, save_checkpoint)
from centernet_ray.config import Config
from centernet_ray.drawing import draw_detections, save_png_grid
from centernet_ray.evaluation.evaluate import EvaluationResult, KeptImage, evaluate
from centernet_ray.evaluation.figures import class_ap_figure, confusion_matrix_figure, heatmap_figure, pr_curves_figure
from centernet_ray.ray_data.pipeline import open_shards, shard_batches
from centernet_ray.tracking import DatasetInput, RunTracker, epoch_metric_names
from centernet_ray.training.budget import TimeBudget, eta_seconds, resumed_plan, run_finished
from centernet_ray.training.engine import LOSS_TERMS, EpochResult, Progress, TrainingEngine

log = logging.getLogger(__name__)

CHECKPOINT_SCORE = "checkpoint_AP"  # the report metric Ray Train ranks checkpoints by (job.checkpoint_config)


def checkpoint_score(metrics: dict[str, Any]) -> float:
    """The score of an epoch's checkpoint from the epoch's report: the AP of its own weights, -1 when
    the epoch was not evaluated (or on ranks > 0, which hold no COCO stats; Ray Train scores rank 0's
    report). Not ``best_AP``: the running best ties every epoch after the best one with it, and Ray
    Train keeps the newest of a tie, so it would delete the best checkpoint."""
    return float(metrics.get("AP", -1.0))


@dataclass
class DatasetFacts:
    """What the driver learned from ingesting the dataset."""

    num_classes: int
    class_names: list[str]
    category_ids: list[int]
    steps_per_epoch: int  # per worker
    val_annotations: str  # instances json (path or URI), read by rank 0 for COCOeval


class WorkerCallback:
    """Hooks into every worker's loop (e.g. tests that inject a failure or record epochs).
    Must be picklable: it travels to the workers with :class:`LoopInputs`."""

    def on_epoch_start(self, epoch: int, rank: int, resumed: bool) -> None:
        """Before epoch ``epoch`` (0-based); ``resumed``: this attempt started from a checkpoint."""


@dataclass
class LoopInputs:
    """Everything ``train_loop_per_worker`` needs, built by the driver (``job.build_trainer``)."""

    config: Config
    dataset: DatasetFacts
    run_name: str
    clock: Any = None  # pipeline.EpochClock actor: the epoch the train pipeline augments for
    deadline: float | None = None  # train.time_limit's end (time.time()); None: train train.epochs epochs
    eval_images: int = 0  # validation images in all (the time budget sizes the evaluation from it)
    threads_per_worker: int = 1  # torch threads of a CPU worker
    log_every: int = 20  # progress line + MLflow step metrics every this many steps
    mlflow_parent_run_id: str | None = None  # a sweep's run: this run is nested under it
    mlflow_tags: dict[str, str] = field(default_factory=dict)
    mlflow_datasets: list[DatasetInput] = field(default_factory=list)
    mlflow_launch: str | None = None  # this start of the job, whatever its attempts (tracking.RunTracker)
    callbacks: list[WorkerCallback] = field(default_factory=list)
    # the dataset it trains on (data.identity.dataset_record), kept beside each checkpoint
    dataset_record: dict[str, str] = field(default_factory=dict)


def _draw_predictions(kept: list[KeptImage], class_names: list[str], path: Path) -> str:
    pictures = []
    for item in kept:
        det, matrix = item.detections, item.input_to_original
        keep = det.scores > 0.3
        boxes = torch.as_tensor(det.boxes[keep]).clone()
        # original pixels -> the letterboxed input shown here (inverse of input_to_original)
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] - matrix[0, 2]) / matrix[0, 0]
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] - matrix[1, 2]) / matrix[1, 1]
        pictures.append(draw_detections(item.image, boxes, det.classes[keep], class_names, det.scores[keep]))
    return save_png_grid(pictures, path)


def _class_ap_metrics(evaluation: EvaluationResult, class_names: list[str]) -> dict[str, float]:
    if evaluation.coco is None:
        return {}
    return {f"val_class_AP/{name}": float(ap) for name, ap in zip(class_names, evaluation.coco.class_ap())
            if not math.isnan(ap)}


def _log_evaluation(tracker: Any, evaluation: EvaluationResult, class_names: list[str], directory: Path) -> None:
    """The final evaluation's pictures and per-class table, under ``evaluation/`` in the run's artifacts."""
    coco, confusion = evaluation.coco, evaluation.confusion
    if evaluation.kept:
        tracker.artifact(_draw_predictions(evaluation.kept, class_names, directory / "val_predictions.png"))
        with_targets = [item for item in evaluation.kept if item.true_heatmap is not None]
        if with_targets:
            tracker.figure(heatmap_figure([k.image for k in with_targets], [k.true_heatmap for k in with_targets],
                                          [k.predicted_heatmap for k in with_targets]),
                           "evaluation/heatmaps_target_vs_predicted.png")
    if coco is None or confusion is None:
        return
    objects = confusion[:-1].sum(axis=1)  # each true object is matched or missed: its row sums to its count
    tracker.table({"class": list(class_names), "AP": _rounded(coco.class_ap()), "AP50": _rounded(coco.class_ap(0.5)),
                   "AP75": _rounded(coco.class_ap(0.75)), "objects": [int(n) for n in objects]},
                  "evaluation/per_class_ap.json")
    tracker.figure(class_ap_figure(coco, class_names), "evaluation/per_class_ap.png")
    tracker.figure(pr_curves_figure(coco, class_names), "evaluation/precision_recall.png")
    tracker.figure(confusion_matrix_figure(confusion, class_names), "evaluation/confusion_matrix.png")


def _rounded(values: Any) -> list[float | None]:
    return [None if math.isnan(v) else round(float(v), 4) for v in values]


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


class _ProgressLog:
    """Rank 0's progress line and MLflow step metrics."""

    def __init__(self, inputs: LoopInputs, tracker: Any, world: int, start_step: int, schedule: _Schedule) -> None:
        self.tracker, self.world, self.start_step = tracker, world, start_step
        self.schedule = schedule  # the planned epochs and steps: a time budget changes them
        self.deadline = inputs.deadline
        self.started = time.perf_counter()

    def __call__(self, p: Progress) -> None:
        rate = p.images * self.world / max(p.seconds, 1e-9)
        eta = eta_seconds(time.perf_counter() - self.started, p.global_step - self.start_step,
                          self.schedule.total_steps - p.global_step,
                          None if self.deadline is None else self.deadline - time.time())
        terms = {k: v.item() for k, v in p.terms.items()}
        log.info("epoch %d/%d step %d/%d  loss %.3f (hm %.3f wh %.3f off %.3f)  lr %.2e  %.0f img/s  data %.0f%%  ETA %s",
                 p.epoch + 1, self.schedule.epochs, p.step, self.schedule.steps_in(p.epoch), terms["total"], terms["heatmap"], terms["size"],
                 terms["offset"], p.lr, rate, 100 * p.data_wait / max(p.seconds, 1e-9),
                 datetime.timedelta(seconds=round(eta)))
        self.tracker.metrics({f"train/loss_{k}": terms[k] for k in LOSS_TERMS} | {
            "train/lr": p.lr, "train/images_per_s": rate, "train/data_wait_s": p.data_wait}, step=p.global_step)


def train_loop_per_worker(inputs: LoopInputs) -> None:
    config, facts, train = inputs.config, inputs.dataset, inputs.config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    ray_compat.quiet_train_reports()
    open_shards()
    device = ray.train.torch.get_device()
    torch.manual_seed(train.seed + rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, inputs.threads_per_worker))

    engine = TrainingEngine(config, facts.num_classes, facts.steps_per_epoch, device)
    start_epoch, best_ap, mlflow_run_id, restored_metrics = 0, -1.0, None, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory, map_location="cpu")
        engine.load_state(state, facts.steps_per_epoch)
        start_epoch = state["epoch"]
        best_ap = state["metrics"].get("best_AP", -1.0)
        mlflow_run_id = state.get("mlflow_run_id")
        restored_metrics = dict(state["metrics"], mlflow_run_id=mlflow_run_id)
        if rank == 0:
            log.info("resumed from the checkpoint of epoch %d", start_epoch)
    # a finished run rerun under its name is reported, not retrained (`run_training` answers such a
    # rerun itself, without workers; a sweep's trial restarted after its last epoch comes here)
    if run_finished(start_epoch, restored_metrics, train.epochs):
        ray.train.report(restored_metrics)
        return
    engine.wrap(ray.train.torch.prepare_model)  # DDP (gloo on CPU, NCCL on GPU)

    schedule = _Schedule(inputs, engine, world, announce=rank == 0)  # rank 0 speaks for all
    schedule.resume(restored_metrics)
    tracker = progress = ground_truth = None
    if rank == 0:
        tracker = RunTracker(config, inputs.run_name, mlflow_run_id, inputs.mlflow_parent_run_id, inputs.mlflow_tags,
                             inputs.mlflow_datasets, inputs.mlflow_launch)
        ground_truth = json.loads(storage.read_bytes(facts.val_annotations))
        progress = _ProgressLog(inputs, tracker, world, engine.global_step, schedule)

    epoch = start_epoch
    try:
        while epoch < schedule.epochs:
            if inputs.clock is not None:
                ray.get(inputs.clock.set_epoch.remote(epoch))
            for callback in inputs.callbacks:
                callback.on_epoch_start(epoch, rank, checkpoint is not None)
            batches = shard_batches("train", config, facts.num_classes, train.batch_size, epoch)
            steps = schedule.steps_in(epoch)
            if steps < facts.steps_per_epoch:  # a time budget's short last epoch: every rank stops at its steps
                batches = itertools.islice(batches, steps)
            result = engine.train_epoch(batches, epoch, log_every=inputs.log_every, steps_per_epoch=steps,
                                        on_progress=progress, on_step=schedule.step_hook(epoch))
            metrics = _epoch_metrics(result, epoch, world, engine.nonfinite_steps)
            last_epoch = schedule.ends_after(epoch)
            metrics["planned_epochs"] = schedule.epochs
            if schedule.budget is not None:
                metrics["planned_last_epoch_steps"] = schedule.last_epoch_steps
            evaluation, class_ap = None, {}
            if (epoch + 1) % train.eval_every == 0 or last_epoch:
                evaluation_started = time.perf_counter()
                val_batches = shard_batches("val", config, facts.num_classes, train.batch_size)
                evaluation = evaluate(engine.detector(), val_batches, facts.category_ids, ground_truth,
                                      keep_images=8 if last_epoch else 0)
                schedule.set_aside(time.perf_counter() - evaluation_started)
                stats, class_ap = evaluation.stats, _class_ap_metrics(evaluation, facts.class_names)
                if rank == 0:
                    log.info("epoch %d evaluation: AP %.4f AP50 %.4f AP75 %.4f (%d images)", epoch + 1, stats["AP"],
                             stats["AP50"], stats["AP75"], stats["eval_images"])
                    best_ap = max(best_ap, stats["AP"])
                metrics.update(stats)  # only evaluation epochs carry COCO stats (Tune schedules on these reports)
            metrics["best_AP"] = best_ap
            metrics[CHECKPOINT_SCORE] = checkpoint_score(metrics)
            if tracker is not None:
                metrics["mlflow_run_id"] = tracker.run_id
                tracker.metrics(epoch_metric_names(metrics) | class_ap, step=engine.global_step)
            _report(engine, inputs, tracker, metrics, epoch, last_epoch, evaluation, rank)
            epoch += 1
    except BaseException as exc:  # the run ends FAILED (KILLED when stopped), not RUNNING forever
        if tracker is not None:
            tracker.close("FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    if tracker is not None:
        tracker.close()


class _Schedule:
    """How many epochs this run trains: ``train.epochs``, or under ``train.time_limit`` as many as the
    :class:`~centernet_ray.training.budget.TimeBudget` fits, the last maybe short (the LR schedule
    refitted to them)."""

    def __init__(self, inputs: LoopInputs, engine: TrainingEngine, world: int, announce: bool) -> None:
        train = inputs.config.train
        self.engine, self.eval_every = engine, train.eval_every
        self.epochs = train.epochs
        self.steps_per_epoch = inputs.dataset.steps_per_epoch
        self.last_epoch_steps = self.steps_per_epoch
        self.budget = None if inputs.deadline is None else TimeBudget(
            inputs.deadline, max_epochs=train.epochs, steps_per_epoch=inputs.dataset.steps_per_epoch,
            batch_size=train.batch_size, eval_images=-(-inputs.eval_images // world), eval_every=train.eval_every,
            flip_test=train.eval_flip_test, announce=announce)

    def resume(self, metrics: dict[str, Any]) -> None:
        """After a restart under a time budget: the plan of the attempt that wrote the checkpoint, the
        LR schedule fitted to it from the first step (else the unfitted ``train`` schedule would run
        until this attempt's steps are timed)."""
        planned = resumed_plan(metrics) if self.budget is not None else None
        if planned is not None:
            self._set(*planned)

    def step_hook(self, epoch: int):
        if self.budget is None or not self.budget.timing:
            return None

        def on_step(taken: int) -> None:
            plan = self.budget.on_step(taken, epoch)
            if plan is not None:
                self._set(plan.epochs, plan.last_epoch_steps)
        return on_step

    def steps_in(self, epoch: int) -> int:
        """The steps epoch ``epoch`` (0-based) trains: all its batches but in a short last epoch."""
        return self.last_epoch_steps if epoch == self.epochs - 1 else self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        """The steps of the whole run as planned."""
        return (self.epochs - 1) * self.steps_per_epoch + self.last_epoch_steps

    def ends_after(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based, just trained) is the run's last."""
        if epoch + 1 >= self.epochs:
            return True
        if self.budget is not None:
            planned = self.budget.after_epoch(epoch + 1, (epoch + 2) % self.eval_every == 0)
            plan = self.budget.plan  # None while the steps are still timed
            if plan is None and planned > epoch + 1:  # no plan of its own yet, no stop: keep the one there
                return False                          # is (train.epochs, or the resumed attempt's plan)
            on_plan = plan is not None and planned == plan.epochs  # else stopped early: this epoch, whole, is the last
            last = plan.last_epoch_steps if on_plan else self.steps_per_epoch
            if (planned, last) != (self.epochs, self.last_epoch_steps):
                self._set(planned, last, refit=planned > epoch + 1)
        return epoch + 1 >= self.epochs

    def set_aside(self, seconds: float) -> None:
        """Time that is not the epoch's (an evaluation): the budget sizes evaluations apart."""
        if self.budget is not None:
            self.budget.set_aside(seconds)

    def _set(self, epochs: int, last_epoch_steps: int, refit: bool = True) -> None:
        self.epochs, self.last_epoch_steps = epochs, last_epoch_steps
        if refit:  # a run stopped early keeps its schedule: it ends with this epoch anyway
            self.engine.fit_schedule(self.total_steps / self.steps_per_epoch)


def _epoch_metrics(result: EpochResult, epoch: int, world: int, nonfinite: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {"epoch": epoch + 1, "images_per_s": result.images * world / max(result.seconds, 1e-9),
                               "nonfinite_steps": nonfinite}
    metrics.update({f"loss_{k}": v for k, v in result.mean_terms.items()})
    return metrics


def _report(engine: TrainingEngine, inputs: LoopInputs, tracker: Any, metrics: dict[str, Any], epoch: int,
            last_epoch: bool, evaluation: EvaluationResult | None, rank: int) -> None:
    """``ray.train.report`` the epoch's metrics, with rank 0's checkpoint on checkpoint epochs; at the
    end, the checkpoint, the evaluation's pictures and the model go to MLflow."""
    config, facts = inputs.config, inputs.dataset
    report_checkpoint = dir_name = None
    if ((epoch + 1) % config.train.checkpoint_every == 0 or last_epoch) and rank == 0:
        state = checkpoint_state(engine.model, config, facts.class_names, facts.category_ids, epoch + 1,
                                 engine.optimizer, engine.scheduler, engine.scaler, _numbers(metrics),
                                 ema=engine.ema.state_dict() if engine.ema is not None else None)
        state["mlflow_run_id"] = tracker.run_id
        dir_name = f"epoch_{epoch + 1:04d}"
        report_checkpoint = _write_checkpoint(state, config, inputs.dataset_record, dir_name)
    if rank == 0 and last_epoch:
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(Path(directory) / CHECKPOINT_FILE, inference_state(state))
            tracker.artifact(Path(directory) / CHECKPOINT_FILE, "checkpoint")
            if evaluation is not None:
                _log_evaluation(tracker, evaluation, facts.class_names, Path(directory))
        if config.tracking.log_model:
            tracker.model(copy.deepcopy(engine.evaluated_module).cpu().float().to(memory_format=torch.contiguous_format),
                          config.data.input_size, config.tracking.registered_model)
    ray.train.report(metrics, checkpoint=report_checkpoint, checkpoint_dir_name=dir_name,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


def _write_checkpoint(state: dict[str, Any], config: Config, dataset_record: dict[str, str],
                      dir_name: str) -> ray.train.Checkpoint:
    """Rank 0's checkpoint (and the run's config and dataset record, which the driver checks a
    resume by), written straight into the run's folder where Ray Train keeps its checkpoints, local
    or in a bucket. Ray Train's default has the worker write it to a local temporary folder that it
    then copies there: every checkpoint written twice (Hourglass-104's with its optimizer state is
    2.3 GB), and on a bucket a local disk as large as the checkpoint."""
    filesystem, run_dir = ray_compat.train_run_storage()
    folder = f"{run_dir}/{dir_name}"

    def write() -> None:
        save_checkpoint(f"{folder}/{CHECKPOINT_FILE}", state, filesystem)
        storage.write_bytes(f"{folder}/{RUN_CONFIG_FILE}", config.to_yaml().encode(), filesystem)
        storage.write_bytes(f"{folder}/{DATA_LOCATIONS_FILE}", json.dumps(dataset_record).encode(), filesystem)

    ray_compat.with_storage_retries(write, "write the checkpoint")
    return ray.train.Checkpoint(folder, filesystem=filesystem)
