"""Sweep building blocks without Ray running: search-space files, trial configs, concurrency, reports."""

import json
from pathlib import Path

import pytest
import yaml

from centernet_ray.config import ConfigError, load_config, with_overrides
from centernet_ray.ray_tune.report import (SweepSummary, TrialRecord, best_config, format_summary, format_table,
                                          record_from_trial)
from centernet_ray.ray_tune.search_space import apply_params, load_search_space, parse_dimension
from centernet_ray.ray_tune.sweep import build_scheduler, build_searcher, derive_max_concurrent, trial_resources
from centernet_ray.ray_tune.trial import trial_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_the_shipped_search_space_covers_the_issue_keys_and_the_defaults_lie_inside_it():
    config = load_config("tune/demo")
    space = load_search_space(config.tune.search_space, config)
    keys = {d.key for d in space.dimensions}
    assert {"loss.alpha", "loss.beta", "loss.wh_weight", "loss.off_weight", "targets.min_overlap",
            "targets.formula"} <= keys
    defaults = space.defaults(config)
    for dim in space.dimensions:  # the baseline trial must be a point of the space (Optuna requires it)
        value = defaults[dim.key]
        if dim.kind in ("choice", "grid"):
            assert value in dim.args
        else:
            assert dim.args[0] <= value <= dim.args[1], dim


def test_every_distribution_kind_parses_to_its_tune_domain(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    space = load_search_space(write(tmp_path, """
loss.alpha: {uniform: [1.0, 3.0]}
train.lr: {loguniform: [1e-4, 1e-2]}
targets.min_overlap: {quniform: [0.3, 0.9, 0.1]}
train.batch_size: {randint: [8, 33]}
targets.formula: {choice: [cornernet, exact]}
loss.off_weight: {grid: [0.5, 1.0]}
train.epochs: 3
"""), load_config())
    tune_space = space.to_tune()
    assert isinstance(tune_space["loss.alpha"], Float) and isinstance(tune_space["train.lr"], Float)
    assert isinstance(tune_space["train.batch_size"], Integer)
    assert isinstance(tune_space["targets.formula"], Categorical)
    assert tune_space["loss.off_weight"] == {"grid_search": [0.5, 1.0]}
    assert tune_space["train.epochs"] == 3
    assert space.has_grid() and [d.key for d in space.searched][-1] == "loss.off_weight"
    sample = tune_space["train.lr"].sample()
    assert 1e-4 <= sample <= 1e-2  # "1e-4" without a dot is a YAML string: read as a number


@pytest.mark.parametrize("text, message", [
    ("loss.alhpa: {uniform: [1, 2]}", "unknown config key"),
    ("alpha: {uniform: [1, 2]}", "unknown config key"),
    ("loss.alpha: {normal: [1, 2]}", "must be a plain value or one of"),
    ("loss.alpha: {uniform: [2, 1]}", "low < high"),
    ("loss.alpha: {uniform: [1]}", "takes 2 numbers"),
    ("loss.alpha: {uniform: [1, x]}", "bounds must be finite numbers"),
    ("tune.num_samples: 8", r"tune.num_samples: a trial trains, and reads no tune.\* setting: set it in the config"),
    ("serve.num_replicas: {choice: [1, 2]}", r"reads no serve.\* setting"),
    ("data.train_annotations: {choice: [a.json, b.json]}", "a sweep ingests its dataset once, before its trials"),
    ("targets.min_overlap: {quniform: [0.3, 0.9, .inf]}", r"bounds must be finite numbers; got inf"),  # sampling failed
    ("train.seed: {randint: [8, 100000000000000000000]}", r"below 2\*\*63"),  # sampling failed: out of int64
    ("loss.alpha: {uniform: [1, " + "9" * 400 + "]}", "bounds must be finite numbers; got 9{38}"),  # OverflowError
    ("model.backbone: {choice: [resnet18, dla34]}\nmodel.width: {uniform: [0.5, 1.0]}",  # valid one key at a time
     r"a trial may train model.backbone='dla34', model.width=0.5, which is not valid: .*ResNet backbones only"),
    ("train.lr: {loguniform: [0, 1]}", "low > 0"),
    ("train.batch_size: {randint: [1.5, 8]}", "integers"),
    ("targets.min_overlap: {uniform: [0.5, 1.0]}", "targets.min_overlap must be > 0.0 and < 1.0"),
    ("targets.formula: {choice: [cornernet, exakt]}", "must be one of"),
    ("loss.alpha: {choice: []}", "non-empty list"),
    ("- loss.alpha", "must map config keys"),
    ("train.batch_size: {uniform: [8, 32]}", "samples fractional values, which this key does not take"),
    ("targets.min_overlap: {quniform: [0.3, 0.9, 0.25]}", "not divisible by quantization factor"),
    ("targets.min_overlap: {quniform: [0.3, 0.9, 0]}", "step must be > 0"),
])
def test_a_bad_search_space_fails_before_any_trial_with_a_message_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_search_space(write(tmp_path, text), load_config())


def test_a_missing_or_unparsable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_search_space(tmp_path / "nope.yaml", load_config())
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_search_space(write(tmp_path, "loss.alpha: {uniform: [1, 2"), load_config())


def test_a_trial_config_is_the_base_plus_its_sample_with_a_run_of_its_own():
    base = load_config(None, ["train.storage_path=/runs", "train.run_name=mine"])
    config = trial_config(base, {"loss.alpha": 2.5, "targets.formula": "exact", "train.batch_size": _np_int(8)},
                          "/runs", "sweep-a", "abc_00001")
    assert config.loss.alpha == 2.5 and config.targets.formula == "exact" and config.train.batch_size == 8
    assert config.train.run_name == "abc_00001" and config.train.storage_path == "/runs/sweep-a/trial_runs"
    assert base.loss.alpha == 2.0 and base.train.run_name == "mine"  # the base is not modified
    assert trial_config(base, {}, "s3://bucket/x", "sw", "t1").train.storage_path == "s3://bucket/x/sw/trial_runs"


def _np_int(value):
    import numpy as np

    return np.int64(value)  # what Tune's randint hands a trial


def test_apply_params_validates_like_an_override():
    with pytest.raises(ConfigError, match="loss.beta must be"):
        apply_params(load_config(), {"loss.beta": -1.0})


def test_concurrency_follows_the_cluster_and_the_trial_size():
    cpu = load_config(None, ["train.num_workers=2", "data.preprocess_max_actors=1"])
    assert trial_resources(cpu) == {"CPU": pytest.approx(3.1), "GPU": 0.0}
    assert derive_max_concurrent(cpu, {"CPU": 8.0}) == 2
    assert derive_max_concurrent(cpu, {"CPU": 2.0}) == 1  # never 0: one trial always runs
    gpu = load_config(None, ["train.num_workers=2", "train.use_gpu=true", "data.preprocess_max_actors=4"])
    assert derive_max_concurrent(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4  # GPUs bind first
    assert derive_max_concurrent(gpu, {"CPU": 8.0, "GPU": 8.0}) == 1  # then preprocessing CPUs
    assert derive_max_concurrent(load_config(None, ["tune.max_concurrent_trials=3"]), {"CPU": 1.0}) == 3


def test_searchers_put_the_default_config_first_and_cap_concurrency(tmp_path):
    config = load_config(None, ["tune.seed=1"])
    space = load_search_space(write(tmp_path, "loss.alpha: {uniform: [1.0, 3.0]}\ntargets.formula: {choice: [cornernet, exact]}"), config)
    random = build_searcher(config, space, include_default=True, max_concurrent=2)
    assert random.max_concurrent == 2 and random._points_to_evaluate == [{"loss.alpha": 2.0, "targets.formula": "cornernet"}]
    optuna_config = load_config(None, ["tune.search_alg=optuna"])
    limited = build_searcher(optuna_config, space, include_default=False, max_concurrent=3)
    assert limited.max_concurrent == 3 and type(limited.searcher).__name__ == "OptunaSearch"
    grid = load_search_space(write(tmp_path, "loss.alpha: {grid: [1.0, 3.0]}"), config)
    with pytest.raises(ConfigError, match="grid"):
        build_searcher(optuna_config, grid, include_default=False, max_concurrent=1)
    asha = build_scheduler(load_config(None, ["train.epochs=9", "tune.grace_period=2"]), str(tmp_path / "asha.pkl"))
    assert asha._time_attr == "epoch" and asha._max_t == 9  # rungs in epochs; grace period checked by the sweep test
    assert build_scheduler(load_config(None, ["tune.scheduler=none"]), "unused") is None


def test_fixed_values_are_the_default_trial_s_and_the_epochs_the_scheduler_counts(tmp_path):
    """README's example: `train.epochs: 4  # fixed for every trial` over a base of 2 epochs. Tune lets a
    preset override a fixed value: the default trial trained 2 epochs, and ASHA (max_t 2) stopped the
    others at epoch 2 of their 4."""
    base = load_config(None, ["train.epochs=2"])
    space = load_search_space(write(tmp_path, "loss.alpha: {uniform: [1.0, 3.0]}\ntrain.epochs: 4"), base)
    assert space.defaults(base) == {"loss.alpha": 2.0, "train.epochs": 4}
    config = space.with_fixed(base)
    assert config.train.epochs == 4 and build_scheduler(config, str(tmp_path / "asha.pkl"))._max_t == 4


@pytest.mark.parametrize("overrides, space_text, message", [
    (["tune.metric=ap"], "loss.alpha: {uniform: [1.0, 3.0]}", "not a COCO statistic"),
    (["tune.grace_period=5", "train.epochs=2"], "loss.alpha: {uniform: [1.0, 3.0]}", "ASHA would have no rung"),
    ([], "train.epochs: {choice: [2, 4]}", "ASHA compares trials at the same epochs"),
])
def test_a_sweep_that_could_not_rank_or_stop_its_trials_is_refused_before_it_starts(tmp_path, overrides, space_text,
                                                                                     message):
    from centernet_ray.ray_tune.sweep import check_sweep

    config = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        check_sweep(config, load_search_space(write(tmp_path, space_text), config))
    check_sweep(load_config(None), load_search_space(write(tmp_path, "loss.alpha: {uniform: [1.0, 3.0]}"), config))


def test_a_trial_that_trained_its_time_budget_s_plan_finished_it_was_not_stopped_early():
    from centernet_ray.ray_tune.report import trained_its_plan

    assert trained_its_plan({"epoch": 7, "planned_epochs": 7}, epochs=100)  # train.time_limit planned 7 of 100
    assert not trained_its_plan({"epoch": 1, "planned_epochs": 7}, epochs=100)  # ASHA stopped it after epoch 1
    assert trained_its_plan({"epoch": 4}, epochs=4) and not trained_its_plan({"epoch": 2}, epochs=4)


def record(trial_id, status, ap, *, alpha=2.0, default=False, epochs=4):
    metrics = {} if ap is None else {"AP": ap, "AP50": ap + 0.2, "AP75": ap - 0.1}
    return TrialRecord(trial_id, {"loss.alpha": alpha}, status, epochs, metrics, f"/ckpt/{trial_id}", f"run-{trial_id}",
                       is_default=default)


def test_the_summary_picks_the_best_scored_trial_and_compares_it_with_the_default(tmp_path):
    trials = [record("t0", "finished", 0.40, default=True), record("t1", "finished", 0.45, alpha=2.7),
              record("t2", "stopped early", 0.10, alpha=1.1, epochs=1), record("t3", "error", None, alpha=1.5)]
    summary = SweepSummary.build("s", trials, "AP", "max", 12.0, "parent")
    assert summary.best.trial_id == "t1" and summary.default.trial_id == "t0"
    assert SweepSummary.build("s", trials, "AP", "min", 1.0, None).best.trial_id == "t2"
    table = format_table(summary)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["trial", "status", "epochs", "loss.alpha"]
    assert lines[2].startswith("t1*") and "t0 (default)" in lines[3] and lines[-1].startswith("t3")
    assert "stopped early" in table and "0.4500" in table
    summary.best_config_path = str(tmp_path / "best.yaml")
    text = format_summary(summary)
    assert "default config: AP 0.4000 (+0.0500 for the best)" in text and "centernet-ray train" in text
    js = summary.to_json()
    assert js["AP"] == 0.45 and js["checkpoint"] == "/ckpt/t1" and js["mlflow_run_id"] == "parent"
    assert [t["status"] for t in js["trials"]] == ["finished", "finished", "stopped early", "error"]
    assert js["best"]["config"] == {"loss.alpha": 2.7} and js["default"]["trial_id"] == "t0"
    assert "failed:      trial t3: no error recorded" in text.splitlines() and not summary.all_failed


def test_the_line_that_says_what_failed_is_picked_from_ray_s_error_formats():
    """Tune's error of a trial, as Ray formats it: a task error ends with its cause's exception; Ray
    Train lists each rank's error (the first failure is rank 0's here, the other rank's a follow-on);
    an actor killed by Ray's memory monitor ends with advice, not with what happened."""
    from centernet_ray.errors import error_message

    task = ("ray::ImplicitFunc.train() (pid=11, ip=10.0.0.1, actor_id=ab12, repr=run_trial)\n"
            '  File "/app/centernet_ray/ray_train/job.py", line 125, in build_trainer\n'
            '    raise UserInputError(f"{train_rows} training images ...")\n'
            "centernet_ray.errors.UserInputError: 24 training images cannot fill one global batch of 64\n")
    assert error_message(task) == "centernet_ray.errors.UserInputError: 24 training images cannot fill one global batch of 64"
    ranks = ("ray::ImplicitFunc.train() (pid=12, ip=10.0.0.1)\n"
             "ray.train.WorkerGroupError: Training failed due to worker errors:\n"
             "[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
             '  File "/app/centernet_ray/ray_train/loop.py", line 300, in train_loop_per_worker\n'
             "    loss.backward()\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n\n"
             "[Rank 1 Error Snippet]:\nTraceback (most recent call last):\n"
             "torch.distributed.DistBackendError: NCCL communicator was aborted on rank 1\n")
    assert error_message(ranks) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    killed = ("ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.\n"
              "\tclass_name: RayTrainWorker\n"
              "The actor's worker process was killed due to the node running low on memory (7.6GB / 8GB).\n"
              "To disable worker killing, set the environment variable `RAY_memory_monitor_refresh_ms` to zero.\n")
    assert error_message(killed) == ("The actor's worker process was killed due to the node running low on memory "
                                     "(7.6GB / 8GB).")
    assert error_message("something went wrong\n  and then more\n") == "and then more"
    assert error_message("") == "no error recorded"


def test_the_summary_names_each_failed_trial_with_its_error_and_a_sweep_of_only_failures_is_failed():
    failures = [TrialRecord(f"t{i}", {"loss.alpha": 2.0}, "error", 0, {}, None, None, error="Traceback ...",
                            error_message=f"ValueError: trial {i} broke", error_file=f"/runs/s/run_trial_t{i}/error.txt")
                for i in range(7)]
    summary = SweepSummary.build("s", failures, "AP", "max", 3.0, "parent")
    assert summary.best is None and summary.all_failed
    lines = format_summary(summary).splitlines()
    assert "failed:      trial t0: ValueError: trial 0 broke  (traceback: /runs/s/run_trial_t0/error.txt)" in lines
    assert sum(line.startswith("failed:      trial ") for line in lines) == 5
    assert "failed:      2 more (in --summary-json's trials)" in lines
    assert not SweepSummary.build("s", [*failures, record("ok", "finished", 0.3)], "AP", "max", 3.0, None).all_failed
    assert not SweepSummary.build("s", [], "AP", "max", 0.0, None).all_failed


def test_the_best_config_is_a_training_config_that_trains_under_a_new_run_name(tmp_path):
    base = load_config(None, ["train.storage_path=/data/runs", "train.run_name=demo"])
    config = best_config(base, record("t1", "finished", 0.5, alpha=2.7), "sweep-x")
    path = tmp_path / "best.yaml"
    path.write_text(config.to_yaml())
    reloaded = load_config(path)
    assert reloaded.loss.alpha == 2.7 and reloaded.train.run_name == "sweep-x-best"
    assert reloaded.train.storage_path == "/data/runs"
    assert yaml.safe_load(path.read_text())["loss"]["alpha"] == 2.7


def test_dimensions_describe_themselves_for_mlflow_params():
    config = load_config()
    assert parse_dimension("loss.alpha", {"uniform": [1, 3]}, config).describe() == "uniform[1, 3]"
    assert parse_dimension("train.epochs", 5, config).describe() == "5"


class FakeTrial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def test_asha_rung_records_survive_a_restore_so_a_weak_trial_after_resume_is_still_stopped(tmp_path):
    import pickle

    config = load_config(None, ["train.epochs=4", "tune.grace_period=1", "tune.reduction_factor=2"])

    def fresh(uri):
        scheduler = build_scheduler(config, str(uri))
        scheduler.set_search_properties("AP", "max")
        return pickle.loads(pickle.dumps(scheduler))  # what Tuner.restore rebuilds: the sweep-start copy

    before = fresh(tmp_path / "asha.pkl")
    before.on_trial_add(None, FakeTrial("good"))
    assert before.on_trial_result(None, FakeTrial("good"), {"epoch": 1, "AP": 0.5}) == "CONTINUE"

    after = fresh(tmp_path / "asha.pkl")  # the sweep was interrupted here and resumed
    after.on_trial_add(None, FakeTrial("weak"))
    assert after.on_trial_result(None, FakeTrial("weak"), {"epoch": 1, "AP": 0.1}) == "STOP"

    amnesiac = fresh(tmp_path / "other.pkl")  # without the saved records nothing can be compared
    amnesiac.on_trial_add(None, FakeTrial("weak"))
    assert amnesiac.on_trial_result(None, FakeTrial("weak"), {"epoch": 1, "AP": 0.1}) == "CONTINUE"


def test_asha_never_stops_the_default_config_trial_but_measures_the_others_against_it(tmp_path):
    config = load_config(None, ["train.epochs=4", "tune.grace_period=1", "tune.reduction_factor=2"])
    scheduler = build_scheduler(config, str(tmp_path / "asha.pkl"), baseline={"loss.alpha": 2.0})
    scheduler.set_search_properties("AP", "max")
    good, default, weak = FakeTrial("good"), FakeTrial("default"), FakeTrial("weak")
    good.config, default.config, weak.config = {"loss.alpha": 2.5}, {"loss.alpha": 2.0}, {"loss.alpha": 1.1}
    for trial in (good, default, weak):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good, {"epoch": 1, "AP": 0.5}) == "CONTINUE"
    assert scheduler.on_trial_result(None, default, {"epoch": 1, "AP": 0.2}) == "CONTINUE"  # would be STOP
    assert scheduler.on_trial_result(None, weak, {"epoch": 1, "AP": 0.1}) == "STOP"


def test_trials_are_listed_in_the_order_tune_created_them_whatever_their_ids():
    """Optuna's trials get random ids: sorting by id put the default-config trial anywhere."""
    from types import SimpleNamespace

    from centernet_ray.ray_tune.report import creation_order

    trials = [SimpleNamespace(trial_id="f3a1b2c4", experiment_tag="10_loss.alpha=1.2"),
              SimpleNamespace(trial_id="0e9d8c7b", experiment_tag="2_loss.alpha=2.9"),
              SimpleNamespace(trial_id="9b8a7f6e", experiment_tag="1_loss.alpha=2.0")]
    assert [t.experiment_tag.partition("_")[0] for t in sorted(trials, key=creation_order)] == ["1", "2", "10"]


def test_a_sweep_resumes_only_with_the_settings_it_started_with(tmp_path):
    """Tune restores the space and the searcher it started with: a rerun with tune.num_samples raised
    reported "interrupted" every time (fewer records than samples), a new key read as None."""
    from centernet_ray.ray_tune.sweep import check_resume, sweep_settings

    config = load_config(None, ["tune.num_samples=4"])
    space = load_search_space(write(tmp_path, "loss.alpha: {uniform: [1.0, 3.0]}"), config)
    saved = json.loads(json.dumps({"mlflow_run_id": "r", "settings": sweep_settings(config, space)}))  # as stored
    check_resume(saved, sweep_settings(config, space), "s")
    check_resume({"mlflow_run_id": "r"}, sweep_settings(config, space), "s")  # a state file from before: no check
    more = load_config(None, ["tune.num_samples=8", "tune.max_concurrent_trials=1"])  # concurrency may change
    wider = load_search_space(write(tmp_path, "loss.alpha: {uniform: [1.0, 3.0]}\nloss.beta: {uniform: [2.0, 6.0]}"),
                              config)
    with pytest.raises(ConfigError, match=r"\(loss.beta, tune.num_samples differ\)"):
        check_resume(saved, sweep_settings(more, wider), "s")
    check_resume(saved, sweep_settings(load_config(None, ["tune.num_samples=4", "tune.max_concurrent_trials=1"]),
                                       space), "s")
    # the base config's training settings too (each restored trial refused them one by one), not its paths or
    # loading settings; a searched key's base value is the space's business
    with pytest.raises(ConfigError, match=r"\(train.batch_size differ\)"):
        check_resume(saved, sweep_settings(load_config(None, ["tune.num_samples=4", "train.batch_size=8"]), space), "s")
    check_resume(saved, sweep_settings(load_config(None, ["tune.num_samples=4", "data.root=/elsewhere",
                                                          "loss.alpha=3.0", "train.eval_every=1"]), space), "s")
    old_state = {"mlflow_run_id": "r", "settings": {k: v for k, v in saved["settings"].items() if k != "base"}}
    check_resume(old_state, sweep_settings(load_config(None, ["tune.num_samples=4", "train.batch_size=8"]), space), "s")


def test_a_sweep_resumes_only_on_the_dataset_it_started_on(tmp_path, monkeypatch):
    """Its finished trials would be ranked with trials trained on other data: a resume given the
    dataset elsewhere, or whose annotation files now hold other content, is refused before the
    ingest; the same relative path from another folder is the same dataset."""
    from centernet_ray import storage
    from centernet_ray.data.identity import annotations_sha256, dataset_record, given_data_locations
    from centernet_ray.data.synthetic import write_shapes_dataset
    from centernet_ray.ray_tune.sweep import check_same_dataset

    def resume(folder: Path, *overrides: str) -> None:
        monkeypatch.chdir(folder)
        config = load_config(None, list(overrides))
        check_same_dataset(saved, given_data_locations(config), storage.with_absolute_paths(config), "s")

    first, second = tmp_path / "first", tmp_path / "second"
    for folder, seed in ((first, 1), (second, 1)):
        write_shapes_dataset(folder / "shapes", num_train=2, num_val=2, image_size=64, seed=seed)
    started = load_config(None, ["data.root=shapes"])
    annotations = {split: first / "shapes" / "annotations" / f"instances_{split}.json" for split in ("train", "val")}
    saved = json.loads(json.dumps({"mlflow_run_id": "r", "dataset": dataset_record(
        started.data, given_data_locations(started), {split: annotations_sha256(str(path)) for split, path in annotations.items()})}))
    resume(first, "data.root=shapes")
    resume(second, "data.root=./shapes/")  # its job's next session, say: the same files elsewhere
    with pytest.raises(ConfigError, match=r"sweep s was started on another dataset \(data.root: 'shapes' -> "
                                          r"'/elsewhere'\): resume it on the same dataset"):
        resume(first, "data.root=/elsewhere")
    write_shapes_dataset(first / "shapes", num_train=2, num_val=2, image_size=64, seed=2)
    with pytest.raises(ConfigError, match=rf"\({annotations['train']}: other content \(sha256 [0-9a-f]{{12}} -> "):
        resume(first, "data.root=shapes")
    saved.pop("dataset")  # a state file from before: nothing to compare
    resume(first, "data.root=/elsewhere")


def test_a_sweep_whose_trials_could_draw_a_batch_too_small_for_batch_norm_is_refused_before_it_starts(tmp_path):
    """config.check_batch_norm_batch for what trials may draw: the smallest listed value or a range's
    lower bound of train.batch_size and data.input_size; the base config when a trial trains it."""
    from centernet_ray.ray_tune.sweep import check_sweep

    def space(text, config):
        return load_search_space(write(tmp_path, text), config)

    base = load_config("coco_hourglass104", ["data.input_size=[256,256]", "train.batch_size=2"])  # 8 values: trains
    check_sweep(base, space("loss.alpha: {uniform: [1.0, 3.0]}", base))
    with pytest.raises(ConfigError, match=r"train.batch_size=1 at data.input_size=\[256, 256\].*over 4 value"):
        check_sweep(base, space("train.batch_size: {randint: [1, 8]}", base))
    with pytest.raises(ConfigError, match=r"train.batch_size=2 at data.input_size=\[128, 256\]"):
        check_sweep(base, space("data.input_size: {choice: [[256, 256], [128, 256]]}", base))
    small = load_config("coco_hourglass104", ["data.input_size=[128,128]", "train.batch_size=2"])  # 2 values
    searched = "train.batch_size: {choice: [8, 16]}"
    with pytest.raises(ConfigError, match="train.batch_size=2 at"):  # the default-config trial trains it
        check_sweep(small, space(searched, small))
    check_sweep(with_overrides(small.to_dict(), ["tune.include_default=false"]), space(searched, small))


@pytest.mark.parametrize("experiment, reported", [
    # Tune reports the checkpoint as its filesystem's path: a bucket's has no scheme
    ("s3://bucket/runs/sweep", "bucket/runs/sweep/trial_runs/a1b2c_00001/epoch_0002"),
    ("/data/runs/sweep", "/data/runs/sweep/trial_runs/a1b2c_00001/epoch_0002"),
])
def test_a_trial_s_checkpoint_and_error_file_are_named_where_they_can_be_read(experiment, reported):
    from types import SimpleNamespace

    config = load_config(Path(__file__).with_name("tiny_tune.yaml"))
    space = load_search_space(Path(__file__).with_name("tiny_space.yaml"), config)
    trial = SimpleNamespace(trial_id="a1b2c_00001", status="TERMINATED", config={"train.lr": 1e-9, "loss.alpha": 2.0},
                            last_result={"epoch": 2, "AP50": 0.5, "checkpoint_path": reported})
    record = record_from_trial(trial, space, config, None, experiment)
    assert record.checkpoint == f"{experiment}/trial_runs/a1b2c_00001/epoch_0002" and record.status == "finished"
    assert record.error is None and record.error_file is None
    # a failed trial: the end of its error is kept (a traceback ends with the message), and Tune's error.txt named
    traceback = "Traceback (most recent call last):\n" + '  File "x.py", line 1, in f\n' * 200 + "ValueError: boom\n"
    failed = SimpleNamespace(trial_id="a1b2c_00002", status="ERROR", config=trial.config, last_result={},
                             path=f"{experiment.removeprefix('s3://')}/run_trial_a1b2c_00002_1", get_error=lambda: traceback)
    record = record_from_trial(failed, space, config, None, experiment)
    assert record.status == "error" and record.error.endswith("ValueError: boom\n") and len(record.error) == 2000
    assert record.error_message == "ValueError: boom"
    assert record.error_file == f"{experiment}/run_trial_a1b2c_00002_1/error.txt"
