"""One Tune trial = one distributed training run: a Tune driver function that builds a ``TorchTrainer``.

This is the Ray Train V2 pattern (not ``Tuner(trainer)``): Tune schedules a light driver actor per
trial, the driver starts the trial's own Train controller and DDP workers, and a Train callback
forwards the workers' reports to Tune so that ASHA can stop the trial between evaluations.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from centernet_ray import storage
from centernet_ray.config import Config, config_from_dict
from centernet_ray.ray_tune.search_space import apply_params

log = logging.getLogger(__name__)

TRIAL_RUNS_DIR = "trial_runs"  # the trials' Ray Train runs, inside the sweep's directory


class EvaluationReports(TuneReportCallback):
    """Forwards to Tune only the reports that carry the objective, i.e. evaluation epochs.

    Training reports every epoch (for checkpoints) but evaluates every ``train.eval_every``
    epochs; Tune's scheduler compares trials on the objective, so the reports without it are
    kept out of Tune (its strict metric check would reject them)."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def trial_config(base: Config, params: dict[str, Any], storage_root: str, sweep_name: str, trial_id: str) -> Config:
    """The full training config of one trial: ``base`` + its sampled ``params``, with the trial's
    Train run named by trial id under the sweep (so a restored trial resumes its own checkpoint)."""
    config = apply_params(base, params)
    config.train.run_name = trial_id
    config.train.storage_path = storage.join(storage_root, sweep_name, TRIAL_RUNS_DIR)
    # Trials keep their checkpoints (MLflow artifacts too) but skip the model export, seconds per
    # trial; training the best config afterwards logs (and registers) its model.
    config.tracking.log_model = False
    return config


def run_trial(params: dict[str, Any], *, base: dict[str, Any], storage_root: str, sweep_name: str,
              metric: str, parent_run_id: str | None, concurrent_trials: int = 1, source: str | None = None,
              data_locations: dict[str, str] | None = None) -> None:
    """Tune's trainable: train ``base`` + ``params`` to the end (or until the scheduler stops it).
    ``data_locations``: the dataset's locations as the sweep's command gave them (``base`` has them
    made absolute), which the trial's checkpoints keep and a restored trial is compared on."""
    import ray.tune
    from ray.data import DataContext

    from centernet_ray.ray_train.job import build_trainer, fit, new_launch

    # Each trial's datasets are driven from its own actor: their progress bars would interleave on the
    # sweep's output. The training loop's progress lines report throughput and data wait instead.
    DataContext.get_current().enable_progress_bars = False
    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(config_from_dict(base), params, storage_root, sweep_name, trial_id)
    tags = {"centernet_ray.sweep": sweep_name, "centernet_ray.trial_id": trial_id}
    # CPU workers of concurrent trials share the node's cores: more threads than cores stalls OpenMP
    threads = max(1, (os.cpu_count() or 1) // (config.train.num_workers * concurrent_trials))
    launch = new_launch()
    trainer, _ = build_trainer(config, threads_per_worker=threads, callbacks=[EvaluationReports(metric)],
                               mlflow_parent_run_id=parent_run_id, mlflow_tags=tags, source=source,
                               data_locations=data_locations, launch=launch, in_a_sweep=True)
    fit(trainer, config, launch)
