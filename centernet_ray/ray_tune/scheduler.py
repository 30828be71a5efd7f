"""ASHA whose rung records survive a sweep's interruption.

``Tuner.restore`` rebuilds the scheduler from the copy pickled when the sweep was created, i.e.
with empty rungs: the trials finished before an interruption would no longer count, and a weak
trial after the resume could not be stopped (nothing to compare it with). This scheduler writes its
state next to the experiment after every decision and reads it back when the resumed sweep adds
its first trial.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from centernet_ray import storage
from centernet_ray.ray_compat import asha_knows_trial, asha_recorded_results, asha_uncount_stop

log = logging.getLogger(__name__)


class ResumableASHA(AsyncHyperBandScheduler):
    """``AsyncHyperBandScheduler`` persisted to ``state_uri`` (a local path or a URI).

    ``baseline``: the params of the default-config trial. It is recorded in the rungs like any
    trial (so the others are measured against it) but never stopped, so that the sweep's best trial
    is compared with a complete run of the default config."""

    def __init__(self, state_uri: str, baseline: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_uri = state_uri
        self._baseline = baseline
        self._state_loaded = False

    def _load_once(self) -> None:
        if self._state_loaded:
            return
        self._state_loaded = True
        if storage.exists(self._state_uri):
            # our own file, written below by this class (same trust as Tune's own pickled experiment state)
            self.__dict__.update(pickle.loads(storage.read_bytes(self._state_uri)))
            recorded = asha_recorded_results(self)
            log.info("ASHA: restored %d rung record(s) from %s", recorded, self._state_uri)

    def _save(self) -> None:
        storage.write_bytes(self._state_uri, pickle.dumps(self.__dict__))

    def on_trial_add(self, tune_controller: Any, trial: Any) -> Any:
        self._load_once()
        if asha_knows_trial(self, trial.trial_id):  # a restored trial keeps its bracket and records
            return None
        out = super().on_trial_add(tune_controller, trial)
        self._save()
        return out

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and self._is_baseline(trial):
            asha_uncount_stop(self)
            action = TrialScheduler.CONTINUE
        self._save()
        return action

    def _is_baseline(self, trial: Any) -> bool:
        config = getattr(trial, "config", None) or {}
        return self._baseline is not None and all(config.get(k) == v for k, v in self._baseline.items())

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()
