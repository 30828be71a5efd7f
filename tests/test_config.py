from pathlib import Path

import pytest

from centernet_ray.config import Config, ConfigError, config_from_dict, load_config, resolve_learning_rate

CONFIGS = Path(__file__).resolve().parents[1] / "centernet_ray" / "configs"  # shipped with the package


def test_defaults_match_the_paper():
    config = Config()
    assert (config.loss.alpha, config.loss.beta) == (2.0, 4.0)
    assert (config.loss.hm_weight, config.loss.wh_weight, config.loss.off_weight) == (1.0, 0.1, 1.0)
    assert (config.targets.min_overlap, config.targets.formula) == (0.7, "cornernet")


def test_overrides_are_parsed_and_typed():
    config = load_config(None, ["loss.alpha=2.5", "data.input_size=[256,320]", "model.deformable=true",
                                "train.lr=null", "targets.formula=exact"])
    assert config.loss.alpha == 2.5 and config.data.input_size == (256, 320)
    assert config.model.deformable is True and config.train.lr is None and config.targets.formula == "exact"
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 would leave "1e-3" a string


@pytest.mark.parametrize("override, message", [
    ("model.backbon=resnet18", "unknown key 'model.backbon'.*valid keys: backbone, width, deformable"),
    ("modle.backbone=resnet18", "unknown key 'modle'.*valid keys: model, loss"),
    ("model.backbone=resnet7", "must be one of 'resnet18'"),
    ("loss.alpha=-1", r"loss.alpha must be >= 0.0 and <= 10.0; got -1.0"),
    ("targets.min_overlap=1.0", r"targets.min_overlap must be > 0.0 and < 1.0"),
    ("train.epochs=ten", "train.epochs must be an integer"),
    ("train.epochs=2.5", "train.epochs must be an integer"),
    ("data.input_size=[100,100]", "multiples of 32"),
    ("data.input_size=512", "must be a list"),
    ("model.deformable=maybe", "true or false"),
    ("alpha=2", "section.key=value"),
    ("train.lr_steps=[120,90]", "increasing"),
    ("train.grad_clip=-5", r"train.grad_clip must be > 0.0; got -5.0"),  # a negative norm reverses the gradients
    ("train.lr=0", r"train.lr must be > 0.0"),
    ("train.time_limit=-1", r"train.time_limit must be > 0.0"),
    ("train.lr=nan", r"train.lr must be a finite number; got nan"),
    ("train.time_limit=inf", "must be a finite number"),
    ("serve.num_gpus=.inf", "must be a finite number"),
    ("train.seed=-1", r"train.seed must be >= 0"),  # numpy's SeedSequence refuses it, inside every task
    ("tune.seed=-3", r"tune.seed must be >= 0"),
    ("model.neck_channels=[-1,0,3]", r"model.neck_channels must be >= 1 each; got \[-1, 0, 3\]"),
    ("loss.alpha=[1", r"^override 'loss.alpha=\[1': cannot parse value '\[1' at line 1, column 3: while parsing a flow "
                      r"sequence; expected ',' or '\]', but got '<stream end>'$"),  # one line, was seven
])
def test_bad_overrides_name_what_is_valid(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, ["loss.beta=3.0", "train.lr_steps=[5,8]"])
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config
    assert config.flatten()["loss.beta"] == 3.0


def test_bad_files_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="model must be a mapping"):
        config_from_dict({"model": 3})


@pytest.mark.parametrize("content, message", [
    ("loss:\n  alpha: 3\ntrain:\n  epochs: 2\nloss:\n  beta: 5\n",  # the first section's alpha was dropped
     r"is not valid YAML at line 5, column 1: 'loss' is given twice \(first on line 1\)$"),
    ("loss:\n  alpha: 3\n  alpha: 4\n", "line 3, column 3: 'alpha' is given twice"),
    ("loss:\n\talpha: 3\n", r"at line 2, column 1: while scanning for the next token; found character '\\t' that "
                              "cannot start any token$"),
    (b"loss:\n  alpha: 3  # mod\xe8le\n", r"is not UTF-8 text \(byte 0xe8 at position 23\): save it as UTF-8$"),
    ("loss: {alpha: 2}\n".encode("utf-16"), r"is not UTF-8 text \(byte 0xff at position 0\)"),  # PowerShell 5's `>`
    ("1: 2\n", "unknown key '1' in config"),  # was a TypeError
    ("null: 1\n", "unknown key 'None' in config"),
])
def test_config_files_that_cannot_be_read_as_written_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_yaml_merge_keys_still_work_with_keys_given_twice_refused(tmp_path):
    """The duplicate-key check used to refuse ``<<:`` (PyYAML resolves merges after it)."""
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  <<: &weights {hm_weight: 2.0, wh_weight: 0.2}\n  wh_weight: 0.3\n")  # written out wins
    config = load_config(path)
    assert (config.loss.hm_weight, config.loss.wh_weight) == (2.0, 0.3)


def test_node_pools_are_off_by_default_and_give_ray_label_selectors_when_on():
    assert load_config(None).cluster.data_selector() is None and load_config(None).cluster.train_selector() is None
    cluster = load_config(None, ["cluster.node_pools=true", "cluster.gpu_pool=a100"]).cluster
    assert cluster.data_selector() == {"centernet-ray/pool": "cpu"}
    assert cluster.train_selector() == {"centernet-ray/pool": "a100"}


def test_node_pool_labels_follow_rays_label_syntax():
    with pytest.raises(ConfigError, match="cluster.pool_label / cluster.cpu_pool: Invalid label key"):
        load_config(None, ["cluster.node_pools=true", "cluster.pool_label=pool name"])


# The official scripts' numbers (xingyizhou/CenterNet experiments/*.sh, opts.py defaults, MODEL_ZOO.md
# schedules): (arch, global batch, lr, epochs, lr steps, head_conv)
OFFICIAL_RECIPES = {
    "coco_resdcn18": ("resdcn18", 114, 5e-4, 140, (90, 120), 64),
    "coco_dla34_1x": ("dla34", 128, 5e-4, 140, (90, 120), 256),
    "coco_dla34_2x": ("dla34", 128, 5e-4, 230, (180, 210), 256),
    "coco_hourglass104": ("hourglass104", 24, 2.5e-4, 50, (40,), 256),
    "coco_resnet18": ("resnet18", 128, 5e-4, 140, (90, 120), 64),  # the official recipe on plain ResNet-18
}


@pytest.mark.parametrize("name", OFFICIAL_RECIPES)
def test_configs_named_after_the_official_zoo_reproduce_its_recipe(name):
    arch, batch, lr, epochs, steps, head_conv = OFFICIAL_RECIPES[name]
    config = load_config(CONFIGS / f"{name}.yaml")
    train = config.train
    assert config.model.backbone == arch and config.model.head_conv == head_conv
    assert train.batch_size * train.num_workers == batch
    assert resolve_learning_rate(train) == pytest.approx(lr, rel=1e-12)
    assert (train.epochs, tuple(train.lr_steps), train.lr_gamma, train.schedule) == (epochs, steps, 0.1, "step")
    assert (train.optimizer, train.weight_decay, train.warmup_epochs, train.grad_clip) == ("adam", 0.0, 0.0, None)
    assert (config.loss.alpha, config.loss.beta, config.loss.hm_weight, config.loss.wh_weight,
            config.loss.off_weight) == (2.0, 4.0, 1.0, 0.1, 1.0)
    assert (config.targets.formula, config.targets.min_overlap, config.targets.max_objects) == ("cornernet", 0.7, 128)
    data = config.data
    assert data.input_size == (512, 512) and data.augment == "centernet_official"
    assert (data.scale_range, data.flip_prob, data.color_jitter) == ((0.6, 1.4), 0.5, 0.4)
    assert train.eval_flip_test is False  # the zoo's first column (no test-time augmentation)


def test_local_paths_are_made_absolute_for_the_workers_and_uris_are_kept(tmp_path, monkeypatch):
    from centernet_ray.storage import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["data.root=shapes", "data.val_annotations=ann/val.json", "data.parquet_dir=s3://b/pq",
                                "train.storage_path=~/runs"])
    resolved = with_absolute_paths(config)
    assert resolved.data.root == str(tmp_path / "shapes") and resolved.data.val_annotations == str(tmp_path / "ann/val.json")
    assert resolved.data.parquet_dir == "s3://b/pq" and resolved.train.storage_path == str(Path("~/runs").expanduser())
    assert resolved.data.train_images == "" and config.data.root == "shapes"  # empty stays empty; the input is untouched
    dla = with_absolute_paths(load_config("coco_dla34_1x"))  # the workers read the weights elsewhere
    assert dla.model.pretrained == str(tmp_path / "weights" / "dla34-ba72cf86.pth")
    assert with_absolute_paths(load_config(None, ["model.pretrained=IMAGENET1K_V1"])).model.pretrained == "IMAGENET1K_V1"


def test_overrides_apply_over_a_config_dict_without_changing_it():
    from centernet_ray.config import with_overrides

    data = load_config("demo").to_dict()
    config = with_overrides(data, ["cluster.node_pools=true", "data.preprocess_compute=actors"])
    assert config.cluster.node_pools and config.data.preprocess_compute == "actors"
    assert data["cluster"]["node_pools"] is False and data["data"]["preprocess_compute"] == "tasks"
    with pytest.raises(ConfigError, match="unknown key 'data.nope'"):
        with_overrides(data, ["data.nope=1"])
