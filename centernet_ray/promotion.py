"""Registry-gated promotion: a trained run's model version takes the ``champion`` alias only when
its export check passed and its validation AP beats the current champion's on the same
validation set; otherwise it stays ``candidate`` and the registry says why.

The Serve endpoint follows ``models:/NAME@champion`` (``serve.model_poll_s``), so a promotion
reaches production without a redeploy.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from typing import Any

from centernet_ray.config import Config

log = logging.getLogger(__name__)

AP_METRIC = "val/AP"
VAL_FINGERPRINT_TAG = "centernet_ray.dataset.val_fingerprint"
REASON_TAG = "centernet_ray.promotion"


@dataclass
class Promotion:
    model: str
    version: str
    promoted: bool
    reason: str
    champion_version: str | None  # the holder before this run

    def describe(self) -> str:
        state = "promoted to champion" if self.promoted else "not promoted"
        return f"{self.model} version {self.version}: {state}: {self.reason}"


def register_version(client, name: str, run_id: str) -> str:
    """The run's version of model ``name``: the one the run registered (``log_model``) or a new one
    whose source is the run's checkpoint."""
    from mlflow.exceptions import MlflowException

    found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if found:
        return str(max(int(v.version) for v in found))
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # it exists
    return str(client.create_model_version(name, f"runs:/{run_id}/checkpoint", run_id=run_id).version)


MAX_DECISIONS = 5  # against a champion that keeps moving (runs finishing together)


def promote(tracking_uri: str, name: str, run_id: str, ap: float, export_passed: bool, export_reason: str = "",
            candidate_alias: str = "candidate", champion_alias: str = "champion") -> Promotion:
    """Register run ``run_id`` under ``name``, alias it ``candidate_alias``, and move
    ``champion_alias`` to it when the export check passed and ``ap`` beats the champion's."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    version = register_version(client, name, run_id)
    client.set_registered_model_alias(name, candidate_alias, version)

    def current_champion():
        try:
            return client.get_model_version_by_alias(name, champion_alias)
        except MlflowException:
            return None

    champion = current_champion()
    promoted, reason = _decide(client, champion, version, run_id, ap, export_passed, export_reason)
    # The registry has no compare-and-set: another run finishing at the same time may have moved the
    # alias while this one decided. Decide again against the champion as it is now, until it holds
    # still; the window left is between the last read and the move, not the whole decision.
    for _ in range(MAX_DECISIONS):
        now = current_champion() if promoted else champion  # not promoting: nothing to race for
        if _version(now) == _version(champion):
            break
        champion = now
        promoted, reason = _decide(client, champion, version, run_id, ap, export_passed, export_reason)
    if promoted:
        client.set_registered_model_alias(name, champion_alias, version)
    client.set_model_version_tag(name, version, REASON_TAG, reason)
    result = Promotion(name, version, promoted, reason, _version(champion))
    log.info("%s", result.describe())
    return result


def _version(model_version: Any) -> str | None:
    """A registry ``ModelVersion``'s number as text; None for no version (no champion yet)."""
    return None if model_version is None else str(model_version.version)


def _decide(client, champion, version: str, run_id: str, ap: float, export_passed: bool,
            export_reason: str) -> tuple[bool, str]:
    if not export_passed:
        return False, f"the export check failed: {export_reason}"
    if math.isnan(ap):
        return False, "the run has no validation AP"
    if champion is None or str(champion.version) == version:
        return True, f"first champion (AP {ap:.4f})"
    ours = client.get_run(run_id).data.tags.get(VAL_FINGERPRINT_TAG)
    held = client.get_run(champion.run_id)
    theirs, their_ap = held.data.tags.get(VAL_FINGERPRINT_TAG), held.data.metrics.get(AP_METRIC, math.nan)
    if ours != theirs:
        return False, (f"the champion (version {champion.version}) was evaluated on another validation set "
                       f"({theirs} vs {ours}): compare them on one, then move the alias by hand")
    if not ap > their_ap:
        return False, f"AP {ap:.4f} does not beat the champion's (version {champion.version}) {their_ap:.4f}"
    return True, f"AP {ap:.4f} beats the champion's (version {champion.version}) {their_ap:.4f}"


def export_and_promote(config: Config, run_id: str, ap: float) -> Promotion:
    """After a training run with ``tracking.registered_model``: export the checkpoint the run logged
    (``runs:/<run>/checkpoint``, what its registered version serves), check it on the validation
    set (logged to the run under ``onnx/``), then :func:`promote`. A failing export or check is a
    reason not to promote, not a failed run."""
    from centernet_ray.export.job import run_export
    from centernet_ray.storage import tracking_uri

    uri = tracking_uri(config.tracking.tracking_uri)
    try:
        with tempfile.TemporaryDirectory() as folder:
            check = run_export(f"runs:/{run_id}/checkpoint", folder, tracking_uri=uri,
                               max_images=config.tracking.export_check_images or None).check
        passed, reason = check.passed, check.reason
    except Exception as exc:  # onnxruntime, unreadable validation images, the store: say why, keep the run
        log.exception("the export check of run %s failed", run_id)
        passed, reason = False, f"{type(exc).__name__}: {exc}"
    return promote(uri, config.tracking.registered_model, run_id, ap, passed, reason,
                   config.tracking.candidate_alias, config.tracking.champion_alias)
