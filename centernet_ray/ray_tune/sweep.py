"""The sweep driver: Tuner over training trials, ASHA, random/Optuna search, resume, MLflow parent run."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import ray
from ray import tune

from centernet_ray import lease, ray_runtime, storage
from centernet_ray.checkpoint import learned_settings
from centernet_ray.config import Config, ConfigError, check_batch_norm_batch
from centernet_ray.data.identity import changed_dataset, dataset_record, given_data_locations
from centernet_ray.evaluation import STAT_NAMES
from centernet_ray.ray_data.ingest import ingest_splits
from centernet_ray.ray_runtime import warn_if_node_local_tracking, warn_if_storage_in_job_working_dir
from centernet_ray.ray_tune.report import SweepSummary, best_config, records_from_results
from centernet_ray.ray_tune.search_space import SearchSpace, apply_params
from centernet_ray.ray_tune.sweep_tracking import SweepTracker, TrialRunCloser
from centernet_ray.ray_tune.trial import run_trial
from centernet_ray.tracking import command_line, run_tags

log = logging.getLogger(__name__)

TRIAL_DRIVER_CPUS = 0.1  # the trial's driver actor only waits on its Train run; workers bring their own resources
SWEEP_STATE_FILE = "centernet_sweep.json"
ASHA_STATE_FILE = "asha_state.pkl"


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished (e.g. Ctrl+C); rerunning resumes it."""


def sweep_name(config: Config) -> str:
    return config.tune.name or f"sweep-{config.model.backbone}"


def trial_resources(config: Config) -> dict[str, float]:
    """What one trial's training run holds: its DDP workers plus its preprocessing stage."""
    train, data = config.train, config.data
    cpus = data.preprocess_max_actors * data.preprocess_num_cpus + TRIAL_DRIVER_CPUS
    cpus += 0 if train.use_gpu else train.num_workers  # a GPU worker's CPU share is counted by Train, not here
    return {"CPU": cpus, "GPU": float(train.num_workers if train.use_gpu else 0)}


def derive_max_concurrent(config: Config, cluster: dict[str, float]) -> int:
    """``tune.max_concurrent_trials``, or as many trials as the cluster's CPUs/GPUs hold at once (>= 1)."""
    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    need = trial_resources(config)
    fits = [cluster.get(kind, 0.0) / amount for kind, amount in need.items() if amount > 0]
    return max(1, math.floor(min(fits)))


def build_searcher(config: Config, space: SearchSpace, include_default: bool, max_concurrent: int) -> Any:
    """Random search (Tune's variant generator) or Optuna's TPE, the default config first when asked.
    The concurrency cap lives here: Tune does not apply ``max_concurrent_trials`` to a search algorithm
    passed in."""
    points = [space.defaults(config)] if include_default else None
    if config.tune.search_alg == "optuna":
        if space.has_grid():
            raise ConfigError("grid: entries need tune.search_alg=random (Optuna samples, it does not enumerate)")
        try:
            from ray.tune.search.optuna import OptunaSearch
            import optuna  # noqa: F401  (OptunaSearch imports it lazily and fails late without it)
        except ImportError as exc:
            raise ConfigError("tune.search_alg=optuna needs Optuna: pip install 'centernet-ray[optuna]'") from exc
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=points, seed=config.tune.seed), max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_concurrent,
                                 random_state=config.tune.seed)


def sweep_settings(config: Config, space: SearchSpace) -> dict[str, Any]:
    """What a resumed sweep must share with the sweep it resumes: Tune keeps the space, the search
    and the trials it started with, so a changed one would be read against trials it never made;
    and the base config's settings that trials learn with (``checkpoint.changed_settings``'s), which
    every restored trial would refuse one by one. As JSON stores them (lists, not tuples)."""
    searched = {d.key for d in space.dimensions}
    base = {key: value for key, value in learned_settings(config).items() if key not in searched}
    return json.loads(json.dumps({
        "space": {d.key: d.describe() for d in space.dimensions},
        "tune": {k: v for k, v in config.to_dict()["tune"].items() if k not in ("name", "max_concurrent_trials")},
        "base": base}))


def check_resume(saved: dict[str, Any], settings: dict[str, Any], name: str) -> None:
    """Refuse to resume sweep ``name`` with settings other than ``saved`` (its state file's), naming
    what changed. A state file from before the settings were saved has none: nothing to compare."""
    before = saved.get("settings")
    if before is None or before == settings:
        return
    changed = sorted({f"{section}.{key}" if section == "tune" else key
                      for section in ("space", "tune", "base") if section in before  # "base": saved since 2026-12
                      for key in set(before[section]) | set(settings[section])
                      if before[section].get(key) != settings[section].get(key)})
    if changed:
        raise ConfigError(f"sweep {name} was started with other settings ({', '.join(changed)} differ): resume it "
                          "with the same search space, tune and training settings, or start a new sweep under "
                          "another tune.name")


def check_same_dataset(saved: dict[str, Any], data_locations: dict[str, str], config: Config, name: str) -> None:
    """Refuse to resume sweep ``name`` on another dataset than the one it started on (``saved``: its
    state file's; ``data_locations``: ``given_data_locations`` of the command's config; ``config``
    with absolute paths): its finished trials would be ranked with trials trained on other data.
    A state file from before the dataset was saved has none: nothing to compare."""
    changed = changed_dataset(saved["dataset"], data_locations, config.data) if "dataset" in saved else []
    if changed:
        raise ConfigError(f"sweep {name} was started on another dataset ({'; '.join(changed)}): resume it on the "
                          "same dataset, or start a new sweep under another tune.name")


def check_sweep(config: Config, space: SearchSpace) -> None:
    """Settings a sweep would otherwise run to the end with and then have nothing to show for: an
    objective no evaluation reports, and what would make ASHA's rungs (epochs of one schedule)
    meaningless; and a batch (base or searched) that a trial's run would refuse."""
    check_batch_norm_batches(config, space)
    if config.tune.metric not in STAT_NAMES:
        raise ConfigError(f"tune.metric {config.tune.metric!r} is not a COCO statistic that trials report; "
                          f"one of {', '.join(STAT_NAMES)}")
    if config.tune.scheduler == "none":
        return
    if any(d.key == "train.epochs" and d.kind != "fixed" for d in space.dimensions):
        raise ConfigError("train.epochs is searched, but ASHA compares trials at the same epochs of one schedule: "
                          "fix it in the search space, or set tune.scheduler=none")
    if config.tune.grace_period > config.train.epochs:
        raise ConfigError(f"tune.grace_period ({config.tune.grace_period}) is more than train.epochs "
                          f"({config.train.epochs}): ASHA would have no rung and never stop a trial")


BATCH_NORM_KEYS = ("train.batch_size", "data.input_size")  # what config.check_batch_norm_batch reads


def trains_the_default(config: Config, space: SearchSpace) -> bool:
    """Whether a trial trains the base config's values of the searched keys (``tune.include_default``;
    a space with ``grid:`` entries enumerates its own trials instead)."""
    return config.tune.include_default and not space.has_grid()


def trial_configs(config: Config, space: SearchSpace, keys: tuple[str, ...]) -> list[Config]:
    """The configs, as far as ``keys`` go, that a trial may train: one per value the space lists for
    a searched key (a choice or grid), and the base config when a trial trains it unchanged
    (``tune.include_default``) or none of ``keys`` is searched."""
    searched = [d for d in space.searched if d.key in keys]
    configs = [config] if not searched or trains_the_default(config, space) else []
    for dimension in searched:
        if dimension.kind in ("choice", "grid"):
            configs += [apply_params(config, {dimension.key: value}) for value in dimension.args]
    return configs


def check_pretrained_files(config: Config, space: SearchSpace) -> None:
    """``preflight.check_pretrained_file`` for each ``model.pretrained`` a trial may train from."""
    from centernet_ray.ray_train.preflight import check_pretrained_file  # its imports (the model zoo): only here

    for trial in trial_configs(config, space, ("model.pretrained",)):
        check_pretrained_file(trial)


def check_trial_workers_fit(config: Config, space: SearchSpace) -> None:
    """``preflight.check_workers_fit`` for a trial's training run (its driver's CPUs included), for each
    value of ``train.num_workers`` and ``train.use_gpu`` the space lists: a sweep whose trials the
    Ray it started cannot start would wait for ever."""
    from centernet_ray.ray_train.preflight import check_workers_fit  # its imports (the model zoo): only here

    for trial in trial_configs(config, space, ("train.num_workers", "train.use_gpu")):
        check_workers_fit(trial, trial_driver_cpus=TRIAL_DRIVER_CPUS)


def check_batch_norm_batches(config: Config, space: SearchSpace) -> None:
    """``check_batch_norm_batch`` for the smallest batch and input a trial may draw (each listed value
    of a searched key, a range's lower bound), and for the base config when a trial trains it
    unchanged (``tune.include_default``) or nothing of it is searched."""
    searched = {d.key: d for d in space.searched if d.key in BATCH_NORM_KEYS}
    if not searched or trains_the_default(config, space):
        check_batch_norm_batch(config)
    smallest = {}
    for key, dimension in searched.items():
        values = dimension.args if dimension.kind in ("choice", "grid") else dimension.args[:1]
        smallest[key] = min(values, key=lambda value: value[0] * value[1] if key == "data.input_size" else value)
    if smallest:
        check_batch_norm_batch(apply_params(config, smallest))


def build_scheduler(config: Config, state_uri: str, baseline: dict[str, Any] | None = None) -> Any:
    """ASHA over evaluation reports; ``baseline`` (the default-config trial's params) is never stopped."""
    if config.tune.scheduler == "none":
        return None
    from centernet_ray.ray_tune.scheduler import ResumableASHA

    # time_attr "epoch": reports arrive only at evaluation epochs, so rungs are in epochs trained
    return ResumableASHA(state_uri, baseline, time_attr="epoch", max_t=config.train.epochs,
                         grace_period=config.tune.grace_period, reduction_factor=config.tune.reduction_factor)


def run_sweep(config: Config, space: SearchSpace, source: str | None = None) -> SweepSummary:
    """Run (or resume: same ``tune.name`` and ``train.storage_path``) the sweep to the end, joining or
    starting Ray (``init_ray``) once the checks that need none pass (settings, bucket, MLflow server,
    the folder's lease, the resume, the dataset, pretrained files). ``source``: the command, shown as
    the MLflow source of the sweep's run and its trials' runs."""
    started = time.perf_counter()
    data_locations = given_data_locations(config)  # as the command gave them, before they are made absolute
    # Paths and the MLflow store resolved in the user's directory: trials run in Ray's session folder,
    # and every trial's run must land in the sweep's store, nested under its run. The space's fixed
    # values are every trial's: the epochs the scheduler and the statuses count are theirs.
    config = space.with_fixed(storage.with_absolute_paths(config))
    check_sweep(config, space)
    source = source or command_line()
    name, root = sweep_name(config), storage.default_storage_path(config)
    storage.require_bucket(root)  # Tune's own writes there would end in a traceback
    storage.require_tracking_server(storage.tracking_uri(config.tracking.tracking_uri))
    experiment = storage.join(root, name)
    warn_if_storage_in_job_working_dir(root, "the sweep's train.storage_path")
    with lease.held(experiment, what=f"sweep {name} ({experiment})",
                    instead="Give this sweep its own tune.name.") as held:
        return _sweep(config, space, source, data_locations, started, held)


def _sweep(config: Config, space: SearchSpace, source: str, data_locations: dict[str, str], started: float,
           held: lease.Lease) -> SweepSummary:
    """``run_sweep``'s checks of the resume, ingest, Tuner and summary, while this command holds the
    sweep's folder (``held``); ``config`` with absolute paths and the space's fixed values."""
    name, root = sweep_name(config), storage.default_storage_path(config)
    experiment = storage.join(root, name)
    state_uri = storage.join(experiment, SWEEP_STATE_FILE)
    restoring = tune.Tuner.can_restore(experiment)
    state = json.loads(storage.read_bytes(state_uri)) if restoring and storage.exists(state_uri) else {}
    settings = sweep_settings(config, space)
    check_resume(state, settings, name)  # before the ingest, which can take long
    check_same_dataset(state, data_locations, config, name)
    check_pretrained_files(config, space)  # every trial would fail on it, one after another
    ray_runtime.init_ray()  # once what needs no Ray is checked
    warn_if_node_local_tracking(config.tracking.tracking_uri)  # counts the cluster's nodes
    check_trial_workers_fit(config, space)
    # once, here: concurrent trials would otherwise race to ingest
    ingested = ingest_splits(config.data, label_selector=config.cluster.data_selector(), reading=held)  # for the trials
    held.confirm()
    include_default = trains_the_default(config, space)
    if config.tune.include_default and space.has_grid():
        log.info("the search space has grid: entries; the default config is not added as a trial of its own")
    max_concurrent = derive_max_concurrent(config, ray.cluster_resources())
    if not restoring:  # built before the sweep's MLflow run, so that a bad setting leaves no run behind
        searcher = build_searcher(config, space, include_default, max_concurrent)
        scheduler = build_scheduler(config, storage.join(experiment, ASHA_STATE_FILE),
                                    space.defaults(config) if include_default else None)
    tags = run_tags(config, source, {"fingerprint": ingested["train"].fingerprint, "train_images": ingested["train"].rows,
                                     "val_images": ingested["val"].rows})
    tracker = SweepTracker(config, name, space, run_id=state.get("mlflow_run_id"), tags=tags)
    dataset = dataset_record(config.data, data_locations,
                             {split: result.annotations_sha256 for split, result in ingested.items()})
    storage.write_bytes(state_uri, json.dumps({"mlflow_run_id": tracker.run_id, "settings": settings,
                                               "dataset": dataset}).encode())

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=config.to_dict(), storage_root=root, sweep_name=name,
                             metric=config.tune.metric, parent_run_id=tracker.run_id,
                             concurrent_trials=max_concurrent, source=source, data_locations=data_locations),
        {"CPU": TRIAL_DRIVER_CPUS})
    try:
        if restoring:  # Tune restores the run config (our callbacks included) from the sweep's start
            log.info("resuming sweep %s from %s (finished trials are kept, unfinished ones continue)", name, experiment)
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            log.info("sweep %s: %d trial(s), up to %d at a time, objective %s (%s), %s search, scheduler %s -> %s",
                     name, config.tune.num_samples, max_concurrent, config.tune.metric, config.tune.mode,
                     config.tune.search_alg, config.tune.scheduler, experiment)
            tuner = tune.Tuner(
                trainable, param_space=space.to_tune(),
                tune_config=tune.TuneConfig(metric=config.tune.metric, mode=config.tune.mode,
                                            num_samples=config.tune.num_samples, search_alg=searcher,
                                            scheduler=scheduler),
                run_config=tune.RunConfig(name=name, storage_path=root, verbose=0,
                                          callbacks=[TrialRunCloser(config, config.train.epochs)]),
            )
        results = tuner.fit()
        records = records_from_results(results, space, config, include_default, experiment)
    except Exception:
        tracker.failed()  # not left RUNNING in MLflow
        raise
    unfinished = [r for r in records if r.status not in ("finished", "stopped early", "error")]
    if unfinished or len(records) < config.tune.num_samples and not space.has_grid():
        tracker.interrupted()
        raise SweepInterrupted(f"sweep {name} stopped with {len(unfinished)} unfinished trial(s) "
                               f"({sum(r.status != 'pending' for r in records)} of {config.tune.num_samples} started); "
                               "rerun the same command (same tune.name and train.storage_path) to resume it")
    summary = SweepSummary.build(name, records, config.tune.metric, config.tune.mode,
                                 time.perf_counter() - started, tracker.run_id)
    if summary.best is not None:
        summary.best_config_path = storage.join(experiment, "best_config.yaml")
        storage.write_bytes(summary.best_config_path, best_config(config, summary.best, name).to_yaml().encode())
    tracker.finish(summary)
    return summary
