"""MLflow for training runs: the driver prepares the store and the run's tags; rank 0 logs the run.

The driver (``job.build_trainer``) resolves the store in the user's directory, creates the
experiment there (MLflow resolves a new experiment's artifact folder in the process that creates
it, and Ray workers run in Ray's session folder) and computes the tags that say what ran
(:func:`run_tags`). Rank 0 opens one run per training job (:class:`RunTracker`), resumed with the
job, and logs params, step and epoch metrics, system metrics and artifacts. Metric names are
grouped the way MLflow's UI shows sections: ``train/...``, ``val/...``, ``val_class_AP/...`` and
MLflow's own ``system/...``.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from centernet_ray import storage
from centernet_ray.config import Config
from centernet_ray.evaluation import STAT_NAMES

log = logging.getLogger(__name__)

DATASET_LOG_ATTEMPTS = 3  # RunTracker: a dataset input lost to a concurrent trial's insert is retried
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint

# Epoch report key -> MLflow metric name (COCO stats go to val/<stat>).
_EPOCH_NAMES = {"epoch": "train/epoch", "images_per_s": "train/epoch_images_per_s",
                "nonfinite_steps": "train/nonfinite_steps", "best_AP": "val/best_AP", "eval_images": "val/images",
                "planned_epochs": "train/planned_epochs", "planned_last_epoch_steps": "train/planned_last_epoch_steps"}


LAUNCH_TAG = "centernet_ray.launch"  # one start of a training job: see RunTracker


def _launch_tag(launch: str | None) -> dict[str, str]:
    return {LAUNCH_TAG: launch} if launch else {}


def _launch_runs(config: Config, launch: str, *, running_only: bool = False) -> tuple[Any, list[Any]]:
    """(an MlflowClient on the config's store, the runs tagged with ``launch``, RUNNING ones only if asked)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        return client, []
    query = f"tags.`{LAUNCH_TAG}` = '{launch}'"
    return client, client.search_runs([experiment.experiment_id],
                                      f"attributes.status = 'RUNNING' and {query}" if running_only else query)


def launch_run_id(config: Config, launch: str) -> str | None:
    """The MLflow run of this start of the job (``launch``), if an attempt opened one."""
    _, runs = _launch_runs(config, launch)
    return runs[0].info.run_id if runs else None


def end_running_launch_runs(config: Config, launch: str, status: str) -> str | None:
    """Mark ``status`` (KILLED, FAILED) the MLflow run of this start of the job if it is still
    RUNNING (its worker was stopped before it could end it); its id, or None when there is none or
    the store cannot be reached (bookkeeping: the failure is what the caller reports)."""
    try:
        client, runs = _launch_runs(config, launch, running_only=True)
        for run in runs:
            client.set_terminated(run.info.run_id, status)
        return runs[0].info.run_id if runs else None
    except Exception as exc:
        log.warning("could not mark the run's MLflow run %s: %s", status, exc)
        return None


def tracking_uri(config: Config) -> str:
    """The MLflow store of ``config`` (see :func:`centernet_ray.storage.tracking_uri`)."""
    return storage.tracking_uri(config.tracking.tracking_uri)


def ensure_experiment(config: Config) -> str:
    """The id of experiment ``tracking.experiment`` in the config's store, created if missing.

    Call it on the driver. MLflow resolves a new experiment's artifact folder (``./mlruns`` for a
    SQLite store) against the working directory of the process that creates it; for a SQLite store
    the experiment is created with its artifacts beside the database instead
    (``<db folder>/mlruns/<experiment>``), wherever the command runs from."""
    from mlflow import MlflowClient

    uri = tracking_uri(config)
    client = MlflowClient(uri)
    name = config.tracking.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        folder = Path(uri[len("sqlite:///"):]).parent
        location = str(folder / "mlruns" / re.sub(r"[^A-Za-z0-9_.-]", "_", name))  # a path, as MLflow stores its default
    return client.create_experiment(name, artifact_location=location)


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, as a user would type it: ``centernet-ray train ...``
    for the CLI (installed script or ``python -m centernet_ray``), ``python -m pkg ...`` for another
    module, else the script and its arguments."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return "python"
    script = Path(argv[0])
    if script.name == "centernet-ray" or (script.name == "__main__.py" and script.parent.name == "centernet_ray"):
        return shlex.join(["centernet-ray", *argv[1:]])
    if script.name == "__main__.py":
        return shlex.join(["python", "-m", script.parent.name, *argv[1:]])
    return shlex.join([script.name, *argv[1:]])


def display_command(command: str) -> str:
    """``command`` with every path shortened to its file name (a YAML config to its stem), for
    ``mlflow.source.name``: MLflow's UI shows a source after its last ``/`` only, so
    ``centernet-ray train /data/cfg/coco.yaml data.root=/data/coco`` would read ``coco``; this
    gives ``centernet-ray train coco data.root=coco``."""
    def short(token: str) -> str:
        key, sep, value = token.partition("=") if "=" in token and not token.startswith("/") else ("", "", token)
        if "/" in value:
            path = PurePosixPath(value.rstrip("/"))
            value = path.stem if path.suffix in (".yaml", ".yml") else path.name
        return f"{key}{sep}{value}"

    try:
        tokens = shlex.split(command)
    except ValueError:  # unbalanced quotes: keep it as it is
        return command
    return shlex.join(short(token) for token in tokens)


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, when it runs from a git checkout."""
    package = Path(__file__).resolve().parents[1]
    try:
        result = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def running_as_ray_job() -> bool:
    """Whether this process is the entrypoint of a Ray job (``ray job submit``): Ray's job supervisor
    gives it the job's config in this variable (``RAY_JOB_ID`` is internal and not set there)."""
    return bool(os.environ.get(RAY_JOB_ENV))


def run_tags(config: Config, source: str, dataset: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Tags that say what ran: the command (``centernet_ray.command``; shortened, as MLflow shows it,
    in ``mlflow.source.name``), the code version, the model, the
    dataset (``dataset``: ``fingerprint``, ``train_images``, ``val_images``, ``classes``) and the
    versions of Ray and torch."""
    from importlib.metadata import version  # Ray's version without importing Ray into the core

    import mlflow
    import torch

    from centernet_ray import __version__

    tags = {"mlflow.source.name": display_command(source), "centernet_ray.command": source,
            "mlflow.source.type": "JOB" if running_as_ray_job() else "LOCAL",
            "centernet_ray.backbone": config.model.backbone, "centernet_ray.version": __version__,
            "centernet_ray.dataset": config.data.root or config.data.train_annotations or "synthetic shapes",
            "ray.version": version("ray"), "torch.version": torch.__version__, "mlflow.version": mlflow.__version__}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for key, value in (dataset or {}).items():
        tags[f"centernet_ray.dataset.{key}"] = str(value)
    return tags


def metric_name(text: str) -> str:
    """``text`` with the characters MLflow rejects in metric names replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", text)


def epoch_metric_names(metrics: Mapping[str, Any]) -> dict[str, float]:
    """An epoch report's numbers under their MLflow names: COCO stats -> ``val/AP`` ..., loss means
    -> ``train/epoch_loss_total`` ..., throughput -> ``train/epoch_images_per_s``."""
    named = {}
    for key, value in metrics.items():
        if not isinstance(value, (int, float)):
            continue
        if key in STAT_NAMES:
            named[f"val/{key}"] = float(value)
        elif key.startswith("loss_"):
            named[f"train/epoch_{key}"] = float(value)
        elif key in _EPOCH_NAMES:
            named[_EPOCH_NAMES[key]] = float(value)
    return named


@dataclass
class DatasetInput:
    """A dataset the run used, shown under "Datasets" in MLflow: the annotation file it was read from
    and the ingest fingerprint as its digest."""

    name: str  # e.g. "train"
    source: str  # path or URI of the instances json
    fingerprint: str
    context: str  # "training" or "validation"


class RunTracker:
    """One MLflow run (created, or resumed from ``run_id``) of a training job, on rank 0.

    ``launch`` names one start of the job (``job.build_trainer``), whatever its attempts: the run
    carries it as the :data:`LAUNCH_TAG` tag. An attempt with no checkpoint to resume from (the one
    before it failed before its first) continues the run of its launch instead of opening another,
    and the driver finds by it the run a dead worker left RUNNING."""

    def __init__(self, config: Config, run_name: str, run_id: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 datasets: list[DatasetInput] | None = None, launch: str | None = None) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri(config))
        mlflow.set_experiment(config.tracking.experiment)
        from_checkpoint = run_id is not None
        if run_id is None and launch:
            run_id = launch_run_id(config, launch)
            if run_id:
                log.info("continuing MLflow run %s of this launch's earlier attempt", run_id)
        if parent_run_id and run_id is None:  # a Tune trial: nested under the sweep's run
            tags = {**(tags or {}), "mlflow.parentRunId": parent_run_id}
        mlflow.set_system_metrics_sampling_interval(config.tracking.system_metrics_interval_s)
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                                    tags=None if run_id else {**(tags or {}), **_launch_tag(launch)},
                                    log_system_metrics=config.tracking.system_metrics)
        self.run_id = self.run.info.run_id
        if from_checkpoint and launch:
            mlflow.set_tags(_launch_tag(launch))  # resumed by a later launch: it is that launch's run now
        if not from_checkpoint:  # again when continued: the attempt before may have died before it had
            mlflow.log_params({k: str(v)[:500] for k, v in config.flatten().items()})
            self.text(config.to_yaml(), "config.yaml")
            for dataset in datasets or []:
                self._log_dataset(dataset)
        log.info("MLflow run %s at %s", self.run_id, tracking_uri(config))

    def _log_dataset(self, dataset: DatasetInput) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.exceptions import MlflowException

        try:
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local source types
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(dataset.source)
        except Exception as exc:  # a scheme MLflow has no source type for: the tags still say it
            log.debug("no MLflow dataset source for %s: %s", dataset.source, exc)
            return
        meta = MetaDataset(source, name=dataset.name, digest=dataset.fingerprint[:12])
        for attempt in range(1, DATASET_LOG_ATTEMPTS + 1):
            try:
                self.mlflow.log_input(meta, context=dataset.context)
                return
            except MlflowException as exc:
                # Trials of a sweep that start together log the same dataset, and MLflow's store
                # looks a dataset up before inserting it: the loser of that race gets a unique-key
                # error (a server sweep with two trials at once). On the retry the lookup finds it.
                if attempt == DATASET_LOG_ATTEMPTS:
                    raise
                log.info("logging dataset %s failed (%s); retrying", dataset.name, str(exc).splitlines()[0][:200])
                time.sleep(0.5 * attempt)

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        """Log ``values`` (already MLflow names) at ``step``."""
        self.mlflow.log_metrics({metric_name(k): float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=folder)

    def text(self, text: str, file_name: str) -> None:
        self.mlflow.log_text(text, file_name)

    def figure(self, figure: Any, file_name: str) -> None:
        """Log a matplotlib figure as a PNG artifact."""
        self.mlflow.log_figure(figure, file_name)

    def table(self, data: dict[str, list], file_name: str) -> None:
        """Log a column dict as an MLflow table artifact (shown as a table in the UI)."""
        self.mlflow.log_table(data, artifact_file=file_name)

    def model(self, model: Any, input_size: tuple[int, int], registered_name: str = "") -> None:
        """Log the model to this run (see :func:`log_model`)."""
        log_model(model, input_size, registered_name)

    def close(self, status: str = "FINISHED") -> None:
        """End the run: ``FINISHED``, ``FAILED`` or ``KILLED``. A failure does not overwrite an end
        another process already recorded: when ASHA stops a Tune trial, the sweep ends the trial's
        run FINISHED while its workers are torn down, and the teardown reaches this loop as an
        exception."""
        if status != "FINISHED":
            try:
                recorded = self.mlflow.tracking.MlflowClient().get_run(self.run_id).info.status
            except Exception:  # noqa: BLE001 - the store unreachable: end the run as asked
                recorded = "RUNNING"
            status = status if recorded == "RUNNING" else recorded
        self.mlflow.end_run(status)


def log_model(model: Any, input_size: tuple[int, int], registered_name: str = "") -> None:
    """Log ``model`` (inputs ``[B, 3, H, W]`` float32 at ``input_size``) to the active MLflow run in
    MLflow's ``pt2`` format (a traced graph: loading it runs no pickle), registered as
    ``registered_name`` when given."""
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, *input_size))]))
    # Batch 2, not 1: torch.export specialises a dimension whose example size is 0 or 1, which
    # would make the logged model reject every batch size but 1.
    example = np.zeros((2, 3, *input_size), dtype=np.float32)
    # The requirements are stated, not inferred: inferring them loads the model in a subprocess
    # (~9 s of CPU at the end of every run, benchmarks/log_model.py) to find what a pt2 graph needs
    # anyway, torch. The serving-input check is off because MLflow's pyfunc wrapper expects one
    # output tensor and the network answers a dict of heads: the check could only print a
    # misleading warning.
    mlflow.pytorch.log_model(model.eval(), name="model", input_example=example, signature=signature,
                             serialization_format="pt2", registered_model_name=registered_name or None,
                             pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                             validate_serving_input=False)


def describe_run(config: Config, run_id: str, markdown: str) -> None:
    """Set the run's description (the Overview tab's text) from the driver."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri(config)).set_tag(run_id, "mlflow.note.content", markdown)

