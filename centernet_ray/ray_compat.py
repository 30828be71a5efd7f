"""The one door to Ray's internals: every use of a private Ray API in the project goes through here.

Ray is pinned exactly (``constraints.txt``) because a few things have no public API: Ray Data's
per-dataset execution options inside a Train ``DataConfig``, Ray's label-selector syntax check,
ASHA's rung records, which checkpoints a Ray Train run resumes from, the folder where a Ray Train
run keeps the checkpoints its workers write and the bucket errors it retries, and (in tests) the
deployments bound into a Serve application and the autoscaler's config validation. Each helper
checks the installed Ray against the version these were written for and fails with a message that
says so, instead of misbehaving silently after an upgrade. (One is cosmetic and does nothing on
another Ray: filtering Ray Train's log line per report.)
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

from centernet_ray.errors import UserInputError

RAY_VERSION = "2.60.0"  # the version whose internals this module was written against


class RayVersionError(UserInputError):
    """The installed Ray is not the one this module's internals were written for (the CLI says so in
    one line: the fix is the install)."""


def require_ray_version(feature: str) -> None:
    """Raise :class:`RayVersionError` unless Ray ``RAY_VERSION`` is installed; ``feature`` names what
    needs the internal API, for the message."""
    import ray

    if ray.__version__ != RAY_VERSION:
        raise RayVersionError(
            f"{feature} uses a private Ray API written for Ray {RAY_VERSION}, but Ray {ray.__version__} is "
            f"installed: install the pinned version (pip install -c constraints.txt ...) or port "
            f"centernet_ray/ray_compat.py to this Ray")


def validate_label_selector(selector: dict[str, str]) -> str | None:
    """Ray's own check of a label selector (``{"key": "value"}``, ``"!value"``, ``"in(a,b)"``, ...):
    the error message, or None when valid."""
    require_ray_version("cluster node-pool labels")
    from ray._private.label_utils import validate_label_selector as check

    return check(selector)


# Ray Train's own switch (ray/train/v2/_internal/constants.py, propagated from the driver to its
# controller and workers). Not version-checked: were it renamed, a run would only start the watcher again.
SINGLE_NODE_TRAIN_ENV = {
    # The PreemptionWatcher actor listens for notices that a node is about to be reclaimed (spot
    # instances); on a Ray of one machine there is no other node, and it is one more process per run.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def _warnings_and_above(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def train_report_logger() -> logging.Logger | None:
    """The logger Ray Train's worker logs each ``ray.train.report`` on (at INFO, with the whole
    metrics dict, once per rank: its only INFO message). Named after its module's file path, so
    reached through the module. None on another Ray version."""
    import ray

    if ray.__version__ != RAY_VERSION:
        return None
    from ray.train.v2._internal.execution import context

    return context.logger


def quiet_train_reports() -> None:
    """Inside a Ray Train worker: no INFO line per ``ray.train.report`` (warnings stay); the training
    loop prints its own line per epoch. Cosmetic: on another Ray version this does nothing rather
    than fail the run."""
    logger = train_report_logger()
    if logger is not None and _warnings_and_above not in logger.filters:
        logger.addFilter(_warnings_and_above)


def execution_options(data_config: Any, dataset_name: str) -> Any:
    """The ``ExecutionOptions`` a Ray Train ``DataConfig`` gives dataset ``dataset_name`` (its
    resource limits and locality), for a subclass that adds to them in ``configure``."""
    require_ray_version("the Train data config")
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        # Ray 2.60's own defaults (DataConfig.default_ingest_options) pass the deprecated
        # exclude_resources on, and every run's log showed a RayDeprecationWarning about it
        warnings.filterwarnings("ignore", message=".*ExecutionOptions.exclude_resources. is deprecated",
                                category=RayDeprecationWarning)
        return data_config._resolve_execution_options(dataset_name)


def asha_recorded_results(scheduler: Any) -> int:
    """How many results the rungs of an ``AsyncHyperBandScheduler`` hold."""
    require_ray_version("ASHA's rung records")
    return sum(len(records) for bracket in scheduler._brackets for _, records in bracket._rungs)


def asha_knows_trial(scheduler: Any, trial_id: str) -> bool:
    """Whether the scheduler has already placed trial ``trial_id`` in a bracket."""
    require_ray_version("ASHA's trial records")
    return trial_id in scheduler._trial_info


def asha_uncount_stop(scheduler: Any) -> None:
    """Take back one stop from the scheduler's count (a STOP decision the caller overrides)."""
    require_ray_version("ASHA's stop count")
    scheduler._num_stopped -= 1


def train_run_storage() -> tuple[Any, str]:
    """Inside a Ray Train worker: (the pyarrow filesystem, the run folder's path in it) where Ray
    Train keeps this run's checkpoints, for a worker that writes a checkpoint there itself and
    reports it with ``CheckpointUploadMode.NO_UPLOAD`` (the storage context is a DeveloperAPI).
    First the check Ray's own upload makes: the marker the driver wrote in the run folder is seen
    from this node, else Ray's error that the storage path is not shared by the cluster's nodes
    (a node-local path would keep the checkpoint where no other node finds it)."""
    require_ray_version("Ray Train's run storage")
    import ray.train

    context = ray.train.get_context().get_storage()
    context._check_validation_file()
    return context.storage_filesystem, context.experiment_fs_path


def with_storage_retries(write: Callable[[], Any], description: str) -> Any:
    """``write()``, retried as Ray Train retries its own checkpoint uploads (its ``call_with_retry``,
    the same arguments): up to 3 attempts, ~1 s then ~2 s apart, on the errors Ray counts as a
    bucket's transient ones (throttling, lost connections); any other error is raised at once."""
    require_ray_version("Ray Train's retries of storage writes")
    from ray._common.retry import call_with_retry
    from ray.train.v2._internal.constants import AWS_RETRYABLE_TOKENS

    return call_with_retry(write, description, match=AWS_RETRYABLE_TOKENS, max_attempts=3)


TRAIN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # in a Ray Train run's folder


def train_checkpoint_records(run_dir: str) -> tuple[tuple[str, dict[str, Any]] | None, list[tuple[str, dict[str, Any]]]]:
    """What a Ray Train run with this folder recorded of its checkpoints, as (folder name such as
    ``epoch_0003``, the metrics reported with it): the latest one, which a resume starts from (a
    checkpoint written but not yet recorded when the run stopped is not), and every one kept. (None,
    []) when there is no snapshot. The kept ones are in score order, not time order."""
    import json

    from centernet_ray import storage

    require_ray_version("Ray Train's checkpoint-manager snapshot")
    path = storage.join(run_dir, TRAIN_SNAPSHOT_FILE)
    if not storage.exists(path):
        return None, []
    snapshot = json.loads(storage.read_bytes(path))
    latest = snapshot.get("latest_checkpoint_result")
    kept = [(result["checkpoint_dir_name"], result["metrics"]) for result in snapshot.get("checkpoint_results", [])]
    return (latest["checkpoint_dir_name"], latest["metrics"]) if latest else None, kept


def train_resume_checkpoint(run_dir: str) -> str | None:
    """The checkpoint folder (``epoch_0003``) a Ray Train run with this folder resumes from: the
    latest one its checkpoint-manager snapshot records; None without one."""
    latest, _ = train_checkpoint_records(run_dir)
    return latest[0] if latest else None


def bound_deployment(application: Any) -> Any:
    """The deployment bound into a Serve ``Application`` (its ``init_args``/``init_kwargs``, options)."""
    require_ray_version("Serve application inspection")
    return application._bound_deployment


def import_attr(path: str) -> Any:
    """Serve's own import of ``module:attribute`` / ``module.attribute`` (what ``serve run`` and
    ``import_path`` in a Serve config use)."""
    require_ray_version("Serve import paths")
    from ray.serve._private.utils import import_attr as serve_import

    return serve_import(path)


def deployment_config(deployment: Any) -> Any:
    """A Serve deployment's resolved ``DeploymentConfig`` (autoscaling, max ongoing requests, ...)."""
    require_ray_version("Serve deployment inspection")
    return deployment._deployment_config


# --- the cluster launcher, KubeRay and runtime_env: what the tests of cluster/ check with Ray's own code

def validate_launcher_config(config: dict[str, Any]) -> None:
    """What `ray up` runs before it touches the cloud: defaults filled in, then Ray's ray-schema.json."""
    require_ray_version("cluster launcher validation")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def launcher_start_command(command: str, labels: dict[str, str]) -> str:
    """``command`` as the launcher runs it on a node of a type with ``labels`` (the labels exported in
    ``RAY_OVERRIDE_LABELS`` in front of it)."""
    require_ray_version("cluster launcher node labels")
    from ray._private.ray_constants import LABELS_ENVIRONMENT_VARIABLE
    from ray.autoscaler._private.command_runner import _with_environment_variables

    return _with_environment_variables(command, {LABELS_ENVIRONMENT_VARIABLE: labels})


def labels_from_environment() -> dict[str, str]:
    """The node labels `ray start` reads from its environment."""
    require_ray_version("node labels from the environment")
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    return ResourceAndLabelSpec._load_env_labels()


def kuberay_node_types(ray_cluster: dict[str, Any]) -> dict[str, Any]:
    """The node types Ray's KubeRay autoscaler derives from a RayCluster resource."""
    require_ray_version("KubeRay autoscaler config")
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    return _derive_autoscaling_config_from_ray_cr(ray_cluster)["available_node_types"]


def working_dir_excluder(root: Any, excludes: list[str]) -> Any:
    """The predicate Ray applies to paths under ``root`` when it uploads a working_dir with ``excludes``."""
    require_ray_version("runtime_env excludes")
    from ray._private.runtime_env.packaging import _get_excludes

    return _get_excludes(root, excludes)
