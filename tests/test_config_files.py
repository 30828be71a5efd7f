"""Configs found by shipped name or path, and ``base:`` inheritance."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from centernet_ray.config import ConfigError, load_config
from centernet_ray.config.files import merge, packaged_names, read_config

SHIPPED = Path(__file__).resolve().parents[1] / "centernet_ray" / "configs"


def test_every_shipped_file_has_a_name_and_loads_by_it():
    names = packaged_names()
    assert {"demo", "coco_resdcn18", "coco_hourglass104", "tune/demo", "tune/search_space"} <= set(names)
    for name in names:
        if not name.startswith("tune/search"):
            assert load_config(name) == load_config(SHIPPED / f"{name}.yaml")


@pytest.mark.parametrize("spelling", ["demo", "demo.yaml", "configs/demo.yaml"])
def test_names_work_from_any_directory(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(spelling) == load_config(SHIPPED / "demo.yaml")


def test_an_unknown_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"neither a file nor a shipped name \(coco_dla34_1x, .*demo"):
        load_config("demo_typo")


def test_the_demo_sweep_is_the_demo_plus_its_sweep_settings():
    sweep, demo = load_config("tune/demo"), load_config("demo")
    assert (sweep.model, sweep.targets, sweep.loss) == (demo.model, demo.targets, demo.loss)
    assert sweep.data == dataclasses.replace(demo.data, synthetic_train_images=4000)  # 2 epochs a trial
    assert sweep.train.epochs == 2 and sweep.train.eval_every == 1 and not sweep.train.eval_flip_test
    assert (sweep.train.lr, sweep.train.num_workers, sweep.train.grad_clip) == (demo.train.lr, 2, 35.0)
    assert sweep.tune.name == "demo-sweep" and sweep.tune.search_space == "tune/search_space"


def test_base_merges_section_by_section_and_the_child_wins(tmp_path):
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump({"loss": {"alpha": 3.0, "beta": 5.0},
                                                          "data": {"input_size": [256, 256]}}))
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nloss: {beta: 6.0}\ntrain: {epochs: 3}\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config.loss.alpha, config.loss.beta) == (3.0, 6.0)
    assert config.data.input_size == (256, 256) and config.train.epochs == 3
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\nloss: {alpha: 1.0}\n")
    assert load_config(tmp_path / "grandchild.yaml").loss.beta == 6.0
    (tmp_path / "on_shipped.yaml").write_text("base: demo\ntrain: {epochs: 1}\n")
    assert load_config(tmp_path / "on_shipped.yaml").model == load_config("demo").model


def test_base_cycles_and_bad_bases_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: [1, 2]\n")
    with pytest.raises(ConfigError, match="base: must name a config"):
        load_config(tmp_path / "c.yaml")


def test_merge_replaces_lists_and_values():
    assert merge({"a": {"x": [1, 2], "y": 1}, "b": 1}, {"a": {"x": [3]}, "c": 2}) == {"a": {"x": [3], "y": 1}, "b": 1, "c": 2}
    assert read_config(SHIPPED / "demo.yaml")["model"]["backbone"] == "resnet18"


def test_a_config_on_object_storage_loads_by_its_uri(tmp_path, monkeypatch):
    """What a sweep with CENTERNET_RAY_STORAGE=s3://... prints: `centernet-ray train s3://.../best_config.yaml`.
    The bucket is a local folder here (pyarrow's S3 needs a server): only the URI's route is faked."""
    import pyarrow.fs

    from centernet_ray import storage

    best = load_config(None, ["train.run_name=sweep-best", "loss.alpha=2.5"])
    (tmp_path / "bucket" / "sweep").mkdir(parents=True)
    (tmp_path / "bucket" / "sweep" / "best_config.yaml").write_text(best.to_yaml())
    real_resolve = storage.resolve

    def resolve(uri):
        if str(uri).startswith("s3://"):
            return pyarrow.fs.LocalFileSystem(), str(tmp_path / str(uri).removeprefix("s3://"))
        return real_resolve(uri)

    monkeypatch.setattr(storage, "resolve", resolve)
    loaded = load_config("s3://bucket/sweep/best_config.yaml")
    assert loaded.train.run_name == "sweep-best" and loaded.loss.alpha == 2.5
    assert load_config(f"file://{tmp_path}/bucket/sweep/best_config.yaml").loss.alpha == 2.5
    with pytest.raises(ConfigError, match="cannot read s3://bucket/sweep/missing.yaml"):
        load_config("s3://bucket/sweep/missing.yaml")
