"""What a sweep produced: one record per trial, the best trial, its config, the summary table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from centernet_ray import storage
from centernet_ray.config import Config
from centernet_ray.errors import error_message
from centernet_ray.evaluation import STAT_NAMES
from centernet_ray.ray_tune.search_space import SearchSpace, apply_params
from centernet_ray.ray_tune.trial import TRIAL_RUNS_DIR


@dataclass
class TrialRecord:
    trial_id: str
    params: dict[str, Any]
    status: str  # "finished", "stopped early" (by the scheduler), "error", "pending", "paused", "running"
    epochs: int  # epochs trained when the trial last reported
    metrics: dict[str, float]
    checkpoint: str | None
    mlflow_run_id: str | None
    is_default: bool = False
    error: str | None = None  # the end of a failed trial's error (a traceback ends with its exception)
    error_message: str | None = None  # the line of it that says what failed (``error_message``)
    error_file: str | None = None  # Tune's error.txt of a failed trial, with the whole traceback

    def to_json(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "config": self.params, "status": self.status, "epochs": self.epochs,
                "metrics": self.metrics, "checkpoint": self.checkpoint, "mlflow_run_id": self.mlflow_run_id,
                "is_default": self.is_default, "error": self.error, "error_message": self.error_message,
                "error_file": self.error_file}


def record_from_trial(trial: Any, space: SearchSpace, config: Config, default_params: dict[str, Any] | None,
                      experiment: str) -> TrialRecord:
    """A :class:`TrialRecord` from a Tune ``Trial`` (as loaded by ``ExperimentAnalysis``).
    ``experiment``: the sweep's folder (path or URI), which holds Tune's folder of each trial and
    the trials' Train runs (``TRIAL_RUNS_DIR``), each named by its trial id, which names the
    checkpoint; Tune's own paths have no scheme on object storage."""
    last = trial.last_result or {}
    checkpoint = last.get("checkpoint_path")
    if checkpoint:
        checkpoint = storage.join(experiment, TRIAL_RUNS_DIR, trial.trial_id, PurePosixPath(checkpoint).name)
    params = {d.key: _plain(trial.config.get(d.key)) for d in space.dimensions}
    epochs = int(last.get("epoch", 0))
    status = {"TERMINATED": "finished", "ERROR": "error"}.get(trial.status, trial.status.lower())
    if status == "finished" and not trained_its_plan(last, config.train.epochs):
        status = "stopped early"
    error = message = error_file = None
    if trial.status == "ERROR":
        raised = trial.get_error()  # None: Tune recorded no error file in the sweep's storage
        if raised is not None:
            text = str(raised)
            error, message = text[-2000:], error_message(text)
            error_file = storage.join(experiment, PurePosixPath(trial.path).name, "error.txt")
    return TrialRecord(
        trial_id=trial.trial_id, params=params, status=status, epochs=epochs,
        metrics={k: float(last[k]) for k in STAT_NAMES if k in last},
        checkpoint=checkpoint, mlflow_run_id=last.get("mlflow_run_id"),
        is_default=default_params is not None and params == default_params, error=error, error_message=message,
        error_file=error_file)


def planned_epochs(last_result: dict[str, Any], epochs: int) -> int:
    """The epochs a trial planned: ``planned_epochs`` of its last report (under ``train.time_limit``
    the budget plans fewer than ``epochs``), else ``epochs``."""
    return int(last_result.get("planned_epochs", epochs))


def trained_its_plan(last_result: dict[str, Any], epochs: int) -> bool:
    """Whether a trial that ended trained every epoch of its plan (:func:`planned_epochs`)."""
    return int(last_result.get("epoch", 0)) >= planned_epochs(last_result, epochs)


def records_from_results(results: Any, space: SearchSpace, config: Config, include_default: bool,
                         experiment: str) -> list[TrialRecord]:
    """Records of every trial of a finished (or interrupted) ``Tuner.fit()``, in creation order
    (``experiment``: see :func:`record_from_trial`)."""
    from ray.tune import ExperimentAnalysis

    defaults = space.defaults(config) if include_default else None
    # statuses: the ResultGrid does not expose them. The analysis lists trials in no fixed order
    # (after a restore it differs).
    # the ResultGrid's filesystem with its path: on object storage the path has no scheme
    analysis = ExperimentAnalysis(results.experiment_path, storage_filesystem=results.filesystem)
    trials = sorted(analysis.trials, key=creation_order)
    records = [record_from_trial(t, space, config, defaults, experiment) for t in trials]
    seen_default = False
    for record in records:  # only the first trial with the default values is "the default trial"
        record.is_default = record.is_default and not seen_default
        seen_default = seen_default or record.is_default
    return records


def creation_order(trial: Any) -> tuple[int, str]:
    """A sort key in the order Tune created the trials: its searchers (random, and Optuna through
    ``SearchGenerator``) start each ``experiment_tag`` with their counter; trial ids are random
    for Optuna's trials."""
    counter = str(getattr(trial, "experiment_tag", "")).partition("_")[0]
    return (int(counter) if counter.isdigit() else 1 << 62, trial.trial_id)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


@dataclass
class SweepSummary:
    name: str
    trials: list[TrialRecord]
    metric: str
    mode: str
    wall_seconds: float
    mlflow_run_id: str | None
    best: TrialRecord | None = None
    default: TrialRecord | None = None
    best_config_path: str | None = None
    searched_keys: list[str] = field(default_factory=list)

    @property
    def all_failed(self) -> bool:
        """Every trial ended in an error: the sweep has nothing to show (its MLflow run ends FAILED)."""
        return bool(self.trials) and all(t.status == "error" for t in self.trials)

    def failure(self) -> str | None:
        """What the command says on stderr when it exits 1 (every trial failed), else None."""
        return f"every trial of sweep {self.name} failed (above: why)" if self.all_failed else None

    @classmethod
    def build(cls, name: str, trials: list[TrialRecord], metric: str, mode: str, wall_seconds: float,
              mlflow_run_id: str | None) -> "SweepSummary":
        scored = [t for t in trials if t.status in ("finished", "stopped early") and _finite(t.metrics.get(metric))]
        best = None
        if scored:
            pick = max if mode == "max" else min
            best = pick(scored, key=lambda t: t.metrics[metric])
        default = next((t for t in trials if t.is_default), None)
        keys = list(trials[0].params) if trials else []
        return cls(name, trials, metric, mode, wall_seconds, mlflow_run_id, best, default, searched_keys=keys)

    def to_json(self) -> dict[str, Any]:
        best_metrics = self.best.metrics if self.best else {}
        return {
            **{k: best_metrics.get(k, math.nan) for k in STAT_NAMES},
            "checkpoint": self.best.checkpoint if self.best else None, "mlflow_run_id": self.mlflow_run_id,
            "wall_seconds": round(self.wall_seconds, 2), "metric": self.metric, "mode": self.mode,
            "trials": [t.to_json() for t in self.trials],
            "best": {**self.best.to_json(), "config_path": self.best_config_path} if self.best else None,
            "default": self.default.to_json() if self.default else None,
        }


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_config(base: Config, best: TrialRecord, sweep_name: str) -> Config:
    """The best trial's full training config, ready for ``centernet-ray train`` as it is: a run name of
    its own (so it trains instead of resuming the trial) and the base config's storage path."""
    config = apply_params(base, best.params)
    config.train.run_name = f"{sweep_name}-best"
    config.train.storage_path = base.train.storage_path
    return config


def format_table(summary: SweepSummary) -> str:
    """The trials as a fixed-width text table, best first by the objective, then unscored trials."""
    keys = summary.searched_keys
    header = ["trial", "status", "epochs", *keys, "AP", "AP50", "AP75"]
    if summary.metric not in ("AP", "AP50", "AP75"):
        header.append(summary.metric)
    sign = -1 if summary.mode == "max" else 1
    ordered = sorted(summary.trials, key=lambda t: (not _finite(t.metrics.get(summary.metric)),
                                                    sign * t.metrics.get(summary.metric, 0.0)))
    rows = []
    for t in ordered:
        marks = ("*" if t is summary.best else "") + (" (default)" if t.is_default else "")
        row = [t.trial_id + marks, t.status, str(t.epochs), *(short(t.params.get(k)) for k in keys)]
        row += [_metric(t.metrics.get(name)) for name in header[3 + len(keys):]]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


MAX_FAILURES_LISTED = 5  # failed trials the summary names, with their error's last line


def format_summary(summary: SweepSummary) -> str:
    lines = ["", f"sweep {summary.name}: {len(summary.trials)} trials, objective {summary.metric} ({summary.mode}), "
             f"{summary.wall_seconds:.0f} s", format_table(summary), ""]
    if summary.best is not None:
        lines.append(f"best: trial {summary.best.trial_id}  {summary.metric} {summary.best.metrics[summary.metric]:.4f}")
        if summary.default is not None and summary.default is not summary.best and summary.metric in summary.default.metrics:
            delta = summary.best.metrics[summary.metric] - summary.default.metrics[summary.metric]
            lines.append(f"default config: {summary.metric} {summary.default.metrics[summary.metric]:.4f} "
                         f"({delta:+.4f} for the best)")
        elif summary.default is summary.best:
            lines.append("the default config was the best trial")
        lines.append(f"best config: {summary.best_config_path}  (train it: centernet-ray train {summary.best_config_path})")
        lines.append(f"checkpoint:  {summary.best.checkpoint}")
    failed = [t for t in summary.trials if t.status == "error"]
    for trial in failed[:MAX_FAILURES_LISTED]:
        where = f"  (traceback: {trial.error_file})" if trial.error_file else ""
        lines.append(f"failed:      trial {trial.trial_id}: {trial.error_message or 'no error recorded'}{where}")
    if len(failed) > MAX_FAILURES_LISTED:
        lines.append(f"failed:      {len(failed) - MAX_FAILURES_LISTED} more (in --summary-json's trials)")
    lines.append(f"mlflow:      sweep run {summary.mlflow_run_id}")
    return "\n".join(lines)


def short(value: Any) -> str:
    """A param value for tables and log lines (floats to 4 significant digits)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metric(value: Any) -> str:
    return f"{value:.4f}" if _finite(value) else "-"
