"""Every config shipped in centernet_ray/configs/ trains through the real job: ``centernet-ray train CONFIG`` with overrides
that point it at a tiny synthetic dataset at 128x128 on the CPU (Hourglass-104 at 256x256, the smallest
size at which it trains on two images), one epoch of two steps.

The list is read from the directory, so a config added without passing this cannot land. What
the overrides change is only what this machine cannot run (COCO, ImageNet weights, GPUs, the
official batch sizes and epoch counts) and how the preprocessing stage runs (tasks); the model,
loss, targets, augmentation preset, optimizer and schedule are each config's own. Configs whose runs here would be the same job run once:
coco_dla34_1x and coco_dla34_2x differ only in their epochs and LR step epochs, which a one-epoch
run overrides and never reaches. The demo's run is test_wheel_install.py's: `centernet-ray train demo`
from an empty folder with the installed wheel, which asserts the same of its MLflow run and checkpoint.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import ray

from centernet_ray.checkpoint import load_checkpoint, model_from_state
from centernet_ray.cli import main
from centernet_ray.config import load_config
from centernet_ray.data.synthetic import write_shapes_dataset
from centernet_ray.evaluation import STAT_NAMES
from centernet_ray.storage import with_absolute_paths

from user_store import assert_run_is_in_the_user_s_store

pytestmark = pytest.mark.integration

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "centernet_ray" / "configs").glob("*.yaml"))
HEAVY = ("dla34", "hourglass104")  # built and trained on the CPU: the heavy_model marker's models


BATCH = 2  # per worker: two steps of the 4 training images


def _input_side(path: Path) -> int:
    """128, or the smallest side at which a batch of ``BATCH`` trains the config's model (the job
    refuses fewer values per channel for its deepest batch norms: Hourglass-104 at 128 has 2)."""
    model = load_config(path).model
    side = 128
    while BATCH * (side // model.input_multiple) ** 2 < model.min_batch_norm_values:
        side += model.input_multiple
    return side


def _overrides(data_root: str, storage: str, run_name: str, side: int) -> list[str]:
    return [
        f"data.root={data_root}", "data.train_images=", "data.train_annotations=", "data.val_images=",
        "data.val_annotations=", "data.parquet_dir=parquet", f"data.input_size=[{side},{side}]",
        # tasks: the session's warm worker processes preprocess, where an actor pool would start two
        # new processes per run, each importing torch and torchvision (~4 s of CPU); the actor pool is
        # test_jobs_integration.py's and test_pipeline_integration.py's
        "data.preprocess_compute=tasks", "data.preprocess_max_actors=1", "data.preprocess_batch_size=2",
        "model.pretrained=null",  # ImageNet / DLA weights cannot be downloaded here; loading them is tested apart
        "train.use_gpu=false", "train.num_workers=1", f"train.batch_size={BATCH}", "train.epochs=1",
        "train.eval_every=1", "train.checkpoint_every=1", f"train.storage_path={storage}",
        f"train.run_name={run_name}",
        "tracking.log_model=false",
    ]


def _job_under_test(path: Path) -> str:
    """What the run of ``path`` here trains, as JSON: its config under this module's overrides, less
    the LR step epochs that a one-epoch run never reaches."""
    job = load_config(path, _overrides("shapes", "runs", "run", _input_side(path))).to_dict()
    job["train"]["lr_steps"] = [epoch for epoch in job["train"]["lr_steps"] if epoch < job["train"]["epochs"]]
    return json.dumps(job, sort_keys=True)


TRAINED_ELSEWHERE = {"demo": "test_wheel_install.py"}  # the config -> the test file that trains it


def _jobs() -> list[list[Path]]:
    """The configs grouped by the job their run here would be, in directory order."""
    groups: dict[str, list[Path]] = {}
    for path in CONFIGS:
        if path.stem in TRAINED_ELSEWHERE:
            continue
        groups.setdefault(_job_under_test(path), []).append(path)
    return list(groups.values())


def _param(configs: list[Path]):
    heavy = load_config(configs[0]).model.backbone in HEAVY
    return pytest.param(configs, id="+".join(path.stem for path in configs),
                        marks=[pytest.mark.heavy_model] if heavy else [])


def test_the_config_directory_is_found():
    assert len(CONFIGS) >= 6, CONFIGS
    for name in TRAINED_ELSEWHERE:  # ...and a config left out here is trained by the test that says so
        assert f'"train", "{name}"' in (Path(__file__).parent / TRAINED_ELSEWHERE[name]).read_text()


def test_configs_that_share_a_run_differ_only_in_the_schedule_length():
    """The grouping saves a run only where the configs are one model and recipe on a longer schedule."""
    shared = [configs for configs in _jobs() if len(configs) > 1]
    assert [[path.stem for path in configs] for configs in shared] == [["coco_dla34_1x", "coco_dla34_2x"]]
    for configs in shared:
        first, *others = [load_config(path).to_dict() for path in configs]
        for other in others:
            differing = {(section, key) for section in first for key in first[section]
                         if first[section][key] != other[section][key]}
            assert differing - {("train", "run_name")} == {("train", "epochs"), ("train", "lr_steps")}, differing


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """4 train and 2 val images of 128x128 (two steps of batch 2), ingested once for every config."""
    root = tmp_path_factory.mktemp("every_config")
    yield write_shapes_dataset(root / "shapes", num_train=4, num_val=2, image_size=128, seed=5), root
    shutil.rmtree(root, ignore_errors=True)  # every config's MLflow artifacts: Hourglass-104's checkpoint alone is 2.3 GB


@pytest.mark.timeout(600)  # a shipped GPU config not refused here would wait for a GPU for ever: fail, not hang
@pytest.mark.parametrize("configs", [_param(configs) for configs in _jobs()])
def test_config_trains_through_the_cli_and_reports_coco_stats(configs, tiny_data, ray_session, tmp_path, monkeypatch,
                                                              capsys, caplog):
    """...and its MLflow run is where the user looks: no tracking settings, so `./mlflow.db` of the
    directory the command ran in (the workers run in Ray's session folder). Before that, a config
    that trains on GPUs, as shipped, is refused in one line by this Ray of no GPU, before the ingest
    (Ray Train would retry its workers' start every minute for ever); on a cluster joined, whose
    autoscaler may start GPU nodes, it is a warning."""
    config = configs[0]
    dataset, root = tiny_data
    monkeypatch.chdir(root)  # relative data paths, as a user types them: the workers run elsewhere
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = _overrides(str(dataset.relative_to(root)), str(tmp_path / "runs"), config.stem, _input_side(config))
    if load_config(config).train.use_gpu and not ray.cluster_resources().get("GPU"):
        _assert_gpu_workers_are_refused_here_and_waited_for_on_a_cluster(config, overrides, monkeypatch, capsys, caplog)
    summary_path = tmp_path / "summary.json"
    assert main(["train", str(config), *overrides, "--summary-json", str(summary_path)]) == 0
    run_id = json.loads(summary_path.read_text())["mlflow_run_id"]
    assert_run_is_in_the_user_s_store(root, run_id, run_name=config.stem, command=f"centernet-ray train {config} ",
                                      shown_as=f"centernet-ray train {config.stem} data.root=shapes ",  # as the UI shows it
                                      backbone=load_config(config).model.backbone, train_images=4, expected_epochs=1)
    if config.stem == "coco_resnet18":  # predict reads an MLflow model URI from the same default store
        images = dataset.relative_to(root) / "images" / "val"
        assert main(["predict", "--checkpoint", f"runs:/{run_id}/model", "--images", str(images),
                     "--output", f"predicted-{run_id}"]) == 0
        assert json.loads((root / f"predicted-{run_id}" / "detections.json").read_text())

    summary = json.loads(summary_path.read_text())
    assert summary["epochs"] == 1 and summary["mlflow_run_id"] and summary["trained"] is True
    for name in STAT_NAMES:  # COCOeval gives -1 for an area range without ground truth
        assert not math.isnan(summary[name]) and (0.0 <= summary[name] <= 1.0 or summary[name] == -1.0), name
    state = load_checkpoint(summary["checkpoint"])  # torch.load(weights_only=True) inside
    expected = with_absolute_paths(load_config(config, overrides))
    assert state["epoch"] == 1 and state["config"]["model"] == expected.to_dict()["model"]
    assert state["config"]["data"]["augment"] == expected.data.augment
    restored = model_from_state(state)  # one read: Hourglass-104's checkpoint with its optimizer is 2.3 GB
    assert type(restored.model).__name__ == ("HourglassCenterNet" if expected.model.backbone == "hourglass104"
                                             else "CenterNet")


def _assert_gpu_workers_are_refused_here_and_waited_for_on_a_cluster(config, overrides, monkeypatch, capsys, caplog):
    import logging

    from centernet_ray.ray_train.preflight import check_workers_fit

    shipped = [override for override in overrides if override not in ("train.use_gpu=false", "train.num_workers=1")]
    shipped.append(f"data.parquet_dir=refused-{config.stem}")  # "parquet" holds the runs' before this one
    count = load_config(config).train.num_workers  # the shipped configs' are all above 1
    workers, gpus = f"{count} training workers (train.num_workers={count}, train.use_gpu=true)", f"{count} GPUs"
    assert main(["train", str(config), *shipped]) == 2
    assert capsys.readouterr().err == (
        f"error: {workers} and the preprocessing need {gpus}, but the Ray this command started has 0 GPUs: set "
        "train.use_gpu=false to train on the CPU; or run on a cluster that has them (RAY_ADDRESS, or `ray job "
        "submit`)\n")
    assert not Path(f"refused-{config.stem}").exists()  # refused before the ingest
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # as a cluster joined: its autoscaler may start GPU nodes
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="centernet_ray.ray_runtime"):
        check_workers_fit(load_config(config, shipped))
    assert [record.getMessage() for record in caplog.records] == [
        f"{workers} and the preprocessing need {gpus}, but this cluster has 0 GPUs now: they wait until nodes with "
        "them join (an autoscaler starts them), or set train.use_gpu=false to train on the CPU"]
    monkeypatch.delenv("RAY_ADDRESS")
