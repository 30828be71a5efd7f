"""MLflow for sweeps: a parent run per sweep; each trial's training run is nested under it.

The trials' runs are created by the training loop itself (rank 0, tagged with the parent run id);
this module owns the sweep's run and closes the trials' runs that the scheduler stopped early
(their workers are killed mid-run, so they never end their own run).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from ray.tune import Callback

from centernet_ray.config import Config
from centernet_ray.ray_tune.report import SweepSummary, format_table, planned_epochs, short, trained_its_plan
from centernet_ray.ray_tune.search_space import SearchSpace
from centernet_ray.tracking import ensure_experiment, tracking_uri

log = logging.getLogger(__name__)


def _client(config: Config) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(config))


class SweepTracker:
    """The sweep's parent MLflow run (created, or reopened when the sweep resumes)."""

    def __init__(self, config: Config, name: str, space: SearchSpace, run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        self.client = _client(config)
        experiment_id = ensure_experiment(config)  # here, on the driver: its artifact folder is resolved here
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        run = self.client.create_run(experiment_id, run_name=name,
                                     tags={**(tags or {}), "centernet_ray.role": "sweep", "centernet_ray.sweep": name})
        self.run_id = run.info.run_id
        tune_params = {f"tune.{k}": v for k, v in config.to_dict()["tune"].items()}
        space_params = {f"space.{d.key}": d.describe() for d in space.dimensions}
        for key, value in {**tune_params, **space_params}.items():
            self.client.log_param(self.run_id, key, str(value)[:500])
        self._log_text("base_config.yaml", config.to_yaml())
        self._log_text("search_space.yaml", space.text)
        log.info("MLflow sweep run %s at %s", self.run_id, tracking_uri(config))

    def _log_text(self, file_name: str, text: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / file_name
            path.write_text(text)
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, summary: SweepSummary) -> None:
        metrics = {"num_trials": len(summary.trials), "wall_seconds": summary.wall_seconds,
                   "num_stopped_early": sum(t.status == "stopped early" for t in summary.trials),
                   "num_errors": sum(t.status == "error" for t in summary.trials)}
        if summary.best is not None:
            metrics[f"best_{summary.metric}"] = summary.best.metrics[summary.metric]
        if summary.default is not None and summary.metric in summary.default.metrics:
            metrics[f"default_{summary.metric}"] = summary.default.metrics[summary.metric]
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value))
        if summary.best is not None:
            self.client.set_tag(self.run_id, "centernet_ray.best_trial", summary.best.trial_id)
        table = format_table(summary)
        self.client.set_tag(self.run_id, "mlflow.note.content",
                            f"Sweep **{summary.name}**: {len(summary.trials)} trials, objective {summary.metric} "
                            f"({summary.mode}), {summary.wall_seconds:.0f} s. Each trial is a child run.\n\n"
                            f"```\n{table}\n```")
        self._log_text("trials.txt", table + "\n")
        self._log_text("sweep_summary.json", json.dumps(summary.to_json(), indent=2, default=str))
        if summary.best_config_path:
            from centernet_ray import storage

            self._log_text("best_config.yaml", storage.read_bytes(summary.best_config_path).decode())
        self.client.set_terminated(self.run_id, "FAILED" if summary.all_failed else "FINISHED")

    def interrupted(self) -> None:
        self.client.set_terminated(self.run_id, "KILLED")

    def failed(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")


class TrialRunCloser(Callback):
    """Tune callback on the sweep's driver: a progress line per trial start/end, and the MLflow run of
    a trial that ended (finished, stopped early or failed) marked terminated with its Tune status."""

    def __init__(self, config: Config, epochs: int) -> None:
        self.config = config
        self.epochs = epochs

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = ", ".join(f"{k}={short(v)}" for k, v in trial.config.items())
        log.info("trial %s started (%d of %d created so far): %s", trial.trial_id,
                 len(trials), self.config.tune.num_samples, params)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        epoch = int(last.get("epoch", 0))
        status = "finished" if trained_its_plan(last, self.epochs) else "stopped early"
        metric = self.config.tune.metric
        value = last.get(metric)
        done = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        log.info("trial %s %s after epoch %d/%d: %s %s  (%d of %d trials done)", trial.trial_id, status, epoch,
                 planned_epochs(last, self.epochs), metric, "n/a" if value is None else f"{value:.4f}", done,
                 self.config.tune.num_samples)
        self._close(last.get("mlflow_run_id"), "FINISHED", status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.warning("trial %s failed: %s", trial.trial_id, trial.error_file or "see its error.txt")
        self._close((trial.last_result or {}).get("mlflow_run_id"), "FAILED", "error")

    def _close(self, run_id: str | None, mlflow_status: str, tune_status: str) -> None:
        if not run_id:
            return
        try:
            client = _client(self.config)
            client.set_tag(run_id, "centernet_ray.tune_status", tune_status)
            recorded = client.get_run(run_id).info.status
            # A trial that completed (finished, or stopped by ASHA) ended well, whatever its workers
            # recorded while they were torn down (their loop sees the stop as an exception: FAILED).
            if recorded == "RUNNING" or (mlflow_status == "FINISHED" and recorded != "FINISHED"):
                client.set_terminated(run_id, mlflow_status)
        except Exception as exc:  # bookkeeping only: never fail the sweep over it
            log.warning("could not close the MLflow run %s of a trial: %s", run_id, exc)

