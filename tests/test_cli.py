import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from centernet_ray.cli import main


def test_data_synth_writes_the_coco_layout(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--train-images", "3", "--val-images", "2", "--image-size", "64"]) == 0
    assert len(list((tmp_path / "images" / "train").glob("*.jpg"))) == 3
    from PIL import Image

    val_images = sorted((tmp_path / "images" / "val").glob("*.jpg"))
    assert len(val_images) == 2 and all(Image.open(path).size == (64, 64) for path in val_images)
    val = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    assert sorted(image["file_name"] for image in val["images"]) == [path.name for path in val_images]
    assert val["annotations"] and {a["image_id"] for a in val["annotations"]} <= {i["id"] for i in val["images"]}


def test_data_ingest_answers_a_rerun_from_its_manifest_without_starting_ray(shapes_dataset, tmp_path, capsys,
                                                                           monkeypatch):
    """Nothing to write: no Ray started (seconds), and `--node-pools` not refused on a machine
    without them, as no task would run; `--force` writes again; a mistyped image folder is refused
    without Ray and leaves the ingest as it was."""
    started = []
    monkeypatch.setattr("centernet_ray.ray_runtime.init_ray", lambda: started.append(True))
    args = ["data", "ingest", "--images", str(shapes_dataset / "images" / "val"), "--annotations",
            str(shapes_dataset / "annotations" / "instances_val.json"), "--out", str(tmp_path / "pq")]
    assert main(args) == 0 and len(started) == 1
    capsys.readouterr()
    assert main([*args, "--node-pools"]) == 0 and len(started) == 1
    assert "pq: 12 images, already up to date" in capsys.readouterr().out
    assert main([*args, "--force"]) == 0 and len(started) == 2
    assert "already up to date" not in capsys.readouterr().out
    mistyped = [*args[:3], str(shapes_dataset / "images" / "vall"), *args[4:]]
    assert main(mistyped) == 2 and len(started) == 2  # refused from the annotations and a listing, no Ray
    assert re.search(r"^error: .* lists 12 images .* the image folder .*vall does not exist\. Is it the right image "
                     r"folder\? Nothing was ingested\.$",
                     capsys.readouterr().err, re.M)
    assert main(args) == 0 and "already up to date" in capsys.readouterr().out  # the earlier ingest is kept


def test_data_check_and_show(shapes_dataset, tmp_path, capsys):
    ann = str(shapes_dataset / "annotations" / "instances_val.json")
    images = str(shapes_dataset / "images" / "val")
    assert main(["data", "check", "--annotations", ann, "--images", images]) == 0
    assert "images: 12" in capsys.readouterr().out
    assert main(["data", "check", "--annotations", ann, "--images", images + "l"]) == 2  # was rc 0, "images: 0"
    assert re.search(r"^error: .* lists 12 images .* the image folder .*vall does not exist\.", capsys.readouterr().err)
    assert main(["data", "check", "--annotations", ann, "--images", ann]) == 2  # a file: one line, no traceback
    assert re.search(r"^error: .* lists 12 images .*/instances_val.json is a file, not a folder\.",
                     capsys.readouterr().err)
    assert main(["data", "show", "--annotations", ann, "--images", images, "--out", str(tmp_path / "g.png"), "--count", "4"]) == 0
    from PIL import Image

    side = Image.open(next((shapes_dataset / "images" / "val").iterdir())).width  # the shapes are square
    with Image.open(tmp_path / "g.png") as grid:  # 4 images in a row, 2 px apart and around (make_grid)
        assert grid.format == "PNG" and grid.size == (4 * (side + 2) + 2, side + 4)


def test_data_show_into_a_folder_past_unreadable_images_and_check_says_what_it_did_not_count(shapes_dataset, tmp_path,
                                                                                              capsys, caplog):
    """`data show --out FOLDER` was an IsADirectoryError, a truncated image a traceback naming no
    file; `data check` printed `unreadable_images: 0` without reading any image (it reads them with
    --read-images)."""
    import shutil

    ann = str(shapes_dataset / "annotations" / "instances_val.json")
    images = tmp_path / "images"
    shutil.copytree(shapes_dataset / "images" / "val", images)
    first = json.loads(Path(ann).read_text())["images"][0]["file_name"]
    (images / first).write_bytes((images / first).read_bytes()[:300])  # truncated
    (tmp_path / "out").mkdir()
    assert main(["data", "show", "--annotations", ann, "--images", str(images), "--out", str(tmp_path / "out"),
                 "--count", "3"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'out' / 'annotations.png'}"
    assert f"skipped 1 image(s) that cannot be drawn: {first} (not a readable image" in caplog.text
    assert main(["data", "show", "--annotations", ann, "--images", str(images), "--out", str(tmp_path / "g.jpg")]) == 2
    assert "error: --out " in capsys.readouterr().err and not (tmp_path / "g.jpg").exists()
    assert main(["data", "check", "--annotations", ann]) == 0
    out = capsys.readouterr().out
    assert "missing_images: not looked for (give --images)" in out and "unreadable_images: not read (give" in out
    assert main(["data", "check", "--annotations", ann, "--images", str(images), "--read-images"]) == 0
    out = capsys.readouterr().out
    assert "images: 11" in out and "unreadable_images: 1" in out and f"unreadable_images e.g. {first} (" in out
    assert main(["data", "check", "--annotations", ann, "--read-images"]) == 2  # nothing to read


def test_eval_scores_ground_truth_as_perfect(shapes_dataset, tmp_path):
    ann = shapes_dataset / "annotations" / "instances_val.json"
    gt = json.loads(ann.read_text())
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                  for a in gt["annotations"]]
    (tmp_path / "det.json").write_text(json.dumps(detections))
    summary = tmp_path / "summary.json"
    assert main(["eval", "--annotations", str(ann), "--detections", str(tmp_path / "det.json"), "--summary-json", str(summary)]) == 0
    stats = json.loads(summary.read_text())
    assert stats["AP"] == 1.0 and "wall_seconds" in stats
    nested = tmp_path / "new" / "folder" / "summary.json"  # created, not found missing after the work
    assert main(["eval", "--annotations", str(ann), "--detections", str(tmp_path / "det.json"),
                 "--summary-json", str(nested)]) == 0
    assert json.loads(nested.read_text())["AP"] == 1.0


def test_data_commands_and_eval_take_uris_as_they_take_paths(shapes_dataset, tmp_path, capsys):
    """A dataset in object storage is named by URI: file:// runs the same code here (s3:// runs in
    test_jobs_integration.py), which a pathlib.Path would break by collapsing the "//"."""
    root = f"file://{shapes_dataset}"
    ann, images = f"{root}/annotations/instances_val.json", f"{root}/images/val"
    assert main(["data", "check", "--annotations", ann, "--images", images]) == 0
    out = capsys.readouterr().out
    assert "images: 12" in out and "missing_images: 0" in out, out
    assert main(["data", "show", "--annotations", ann, "--images", images, "--out", f"file://{tmp_path}/g.png", "--count", "2"]) == 0
    from PIL import Image

    side = Image.open(next((shapes_dataset / "images" / "val").iterdir())).width  # the shapes are square
    with Image.open(tmp_path / "g.png") as grid:  # the 2 images, written through the file:// URI
        assert grid.format == "PNG" and grid.size == (2 * (side + 2) + 2, side + 4)
    gt = json.loads((shapes_dataset / "annotations" / "instances_val.json").read_text())
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                  for a in gt["annotations"]]
    (tmp_path / "det.json").write_text(json.dumps(detections))
    summary = tmp_path / "summary.json"
    assert main(["eval", "--annotations", ann, "--detections", f"file://{tmp_path}/det.json",
                 "--summary-json", str(summary)]) == 0
    assert json.loads(summary.read_text())["AP"] == 1.0
    written = tmp_path / "synth"
    assert main(["data", "synth", "--out", f"file://{written}", "--train-images", "2", "--val-images", "1",
                 "--image-size", "32"]) == 0
    assert sorted(p.relative_to(written).as_posix() for p in written.rglob("*") if p.is_file()) == [
        "annotations/instances_train.json", "annotations/instances_val.json", "images/train/000000.jpg",
        "images/train/000001.jpg", "images/val/000000.jpg"]
    assert not (tmp_path / "file:").exists() and not Path("file:").exists()
    capsys.readouterr()
    assert main(["eval", "--annotations", ann, "--detections", f"file://{tmp_path}/det.json",
                 "--summary-json", f"file://{tmp_path}/summary.json"]) == 2  # written by this process: a local file
    assert "give a local file" in capsys.readouterr().err


def test_eval_refuses_detections_it_cannot_score_in_one_line(shapes_dataset, tmp_path, capsys):
    ann = shapes_dataset / "annotations" / "instances_val.json"
    good = {"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}
    for detections, message in (([{**good, "image_id": 99}], "detection 0 names image_id 99, which the ground truth lacks"),
                                ([good, {**good, "category_id": 7}], "detection 1 names category_id 7"),
                                ([{"image_id": 1, "score": 0.5}], "detection 0 needs image_id, category_id, bbox"),
                                ([{**good, "bbox": [1, 2, 3]}], "bbox must be [x, y, width, height]")):
        (tmp_path / "det.json").write_text(json.dumps(detections))
        assert main(["eval", "--annotations", str(ann), "--detections", str(tmp_path / "det.json")]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "gt.json").write_text(json.dumps({"images": 3, "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    assert main(["eval", "--annotations", str(tmp_path / "gt.json"), "--detections", str(tmp_path / "det.json")]) == 2
    assert "'images' must be a list, got int" in capsys.readouterr().err


def test_config_command_prints_yaml_with_overrides(capsys):
    assert main(["config", "loss.alpha=3"]) == 0
    assert "alpha: 3.0" in capsys.readouterr().out


def test_bad_override_exits_2_with_a_message(capsys):
    assert main(["config", "loss.alhpa=3"]) == 2
    assert "valid keys: alpha, beta" in capsys.readouterr().err


def test_version_names_the_package_and_its_stack(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    line = capsys.readouterr().out
    assert exited.value.code == 0 and line.startswith("centernet-ray 0.1.0 (Python 3.") and line.count("\n") == 1
    assert f"torch {metadata.version('torch')}, " in line and f"ray {metadata.version('ray')}, " in line


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "centernet_ray", "--help"], capture_output=True, text=True, check=True)
    assert "data" in result.stdout and "eval" in result.stdout


def test_tune_reports_a_bad_search_space_before_starting_anything(tmp_path, capsys):
    from centernet_ray.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("loss.alhpa: {uniform: [1, 2]}\n")
    assert main(["tune", "--search-space", str(space), "tune.num_samples=2"]) == 2
    assert "loss.alhpa: unknown config key" in capsys.readouterr().err
    import ray

    had_ray = ray.is_initialized()
    assert main(["tune", "tune.metric=ap"]) == 2
    assert "tune.metric 'ap' is not a COCO statistic" in capsys.readouterr().err
    assert ray.is_initialized() == had_ray  # refused before a Ray was started for it


def test_overrides_may_follow_options(tmp_path, capsys):
    from centernet_ray.cli import main

    assert main(["config", "loss.alpha=2.5"]) == 0
    assert "alpha: 2.5" in capsys.readouterr().out
    assert main(["config", "demo", "-v", "loss.alpha=3.5", "train.run_name=2024-12-03"]) == 0  # after an option
    printed = capsys.readouterr().out
    assert "alpha: 3.5" in printed and "run_name: '2024-12-03'" in printed  # a text setting as typed, not a date
    assert main(["config", "model.pretrained=2024"]) == 0 and "pretrained: '2024'" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["tune", "--search-space", "x.yaml", "--nonsense"])
    trial = tmp_path / "alpha=2.5,beta=3" / "best.yaml"  # a Tune trial's folder: a path, not an override
    trial.parent.mkdir()
    trial.write_text("loss:\n  alpha: 2.5\n")
    assert main(["config", str(trial), "loss.beta=3"]) == 0
    assert "alpha: 2.5" in capsys.readouterr().out
    assert main(["config", "alpha=2"]) == 2  # an override without its section, not a missing file
    assert "must look like section.key=value" in capsys.readouterr().err


def test_user_errors_are_one_line_and_program_faults_keep_their_traceback(tmp_path, capsys, monkeypatch):
    import torch

    import centernet_ray.cli as cli

    monkeypatch.setattr("centernet_ray.ray_runtime.init_ray", lambda: None)  # fails before it needs Ray
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")  # a checkpoint of something else
    assert main(["predict", "--checkpoint", str(tmp_path / "other.pt"), "--images", str(tmp_path),
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a centernet-ray checkpoint" in err and err.count("\n") == 1, err

    def broken(args):
        raise ValueError("an internal invariant broke")  # e.g. from torch, deep inside a command

    monkeypatch.chdir(tmp_path)  # DLA-34's weights file, relative to here, is not there: refused before the ingest
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True}])  # a Ray of one machine: the workers' files are here
    assert main(["train", "coco_dla34_1x", f"train.storage_path={tmp_path / 'runs'}"]) == 2
    assert (f"model.pretrained: no weights file {tmp_path / 'weights' / 'dla34-ba72cf86.pth'}"
            in capsys.readouterr().err)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "dla34-ba72cf86.pth").write_bytes(b"<html>404 Not Found</html>")  # a failed download
    assert main(["train", "coco_dla34_1x", f"train.storage_path={tmp_path / 'runs'}"]) == 2  # loaded before the ingest
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'weights' / 'dla34-ba72cf86.pth'} is not DLA-34 weights: not a "
                          "torch.save file (Unsupported operand 60)") and err.count("\n") == 1, err

    monkeypatch.setattr(cli, "_cmd_config", broken)
    with pytest.raises(ValueError, match="internal invariant"):  # not swallowed into "error: ..."
        main(["config"])


def test_a_batch_too_small_for_the_backbone_s_batch_norm_is_refused_before_the_ingest(tmp_path, capsys, monkeypatch):
    """Hourglass-104 at 128x128 with 2 images per worker: its innermost level is 1x1, and batch norm
    over 2 values makes every gradient explode (tests/test_model_zoo.py measures the sizes)."""
    from centernet_ray.config import ConfigError, check_batch_norm_batch, load_config

    def no_ray():
        raise AssertionError("Ray started before the check")

    monkeypatch.setattr("centernet_ray.ray_runtime.init_ray", no_ray)  # answered before Ray starts
    for command in ("train", "tune"):
        assert main([command, "coco_hourglass104", "data.input_size=[128,128]", "train.batch_size=2",
                     f"train.storage_path={tmp_path / 'runs'}"]) == 2
        assert ("error: train.batch_size=2 at data.input_size=[128, 128] is too small for hourglass104: the batch "
                "norms at its deepest level (1x1, 1/128 of the input) would normalise over 2 value(s) per channel, "
                "and gradients explode below 8; raise train.batch_size (per worker) or data.input_size"
                ) in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    for overrides in (["data.input_size=[256,128]", "train.batch_size=4"], ["data.input_size=[128,128]", "train.batch_size=8"]):
        check_batch_norm_batch(load_config("coco_hourglass104", overrides))  # 8 values
    check_batch_norm_batch(load_config("coco_resnet18", ["data.input_size=[32,32]", "train.batch_size=4"]))
    with pytest.raises(ConfigError, match=r"over 3 value\(s\) per channel, and gradients explode below 4"):
        check_batch_norm_batch(load_config("coco_resnet18", ["data.input_size=[32,32]", "train.batch_size=3"]))


def test_a_tracking_server_that_does_not_answer_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    """A server down or a mistyped port: train and tune answer at once (MLflow's client retried for
    ~4 minutes, after the Ray start and the ingest), and so do predict and serve naming a model."""
    import socket

    monkeypatch.setattr("centernet_ray.ray_runtime.init_ray", lambda: pytest.fail("Ray started"))
    monkeypatch.chdir(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        server = f"http://127.0.0.1:{probe.getsockname()[1]}"
    refused = f"error: the MLflow tracking server {server} does not answer (Connection refused): start it"
    for argv in (["train", "demo", f"tracking.tracking_uri={server}"], ["tune", f"tracking.tracking_uri={server}"],
                 ["predict", "--checkpoint", "models:/shapes@champion", "--images", ".", "--output", "o",
                  "--tracking-uri", server]):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.startswith(refused), argv
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    assert main(["serve", "--checkpoint", "models:/shapes@champion"]) == 2
    assert capsys.readouterr().err.startswith(refused)
    assert not (tmp_path / "outputs").exists()  # the leases' folders were removed


def test_a_finished_run_is_answered_from_its_records_before_ray_starts(tmp_path, capsys, monkeypatch):
    """A rerun of a finished run: the summary from Ray Train's records of its checkpoints (as
    tests/test_train_integration.py reads them from a real run), without starting Ray."""
    from centernet_ray.ray_compat import TRAIN_SNAPSHOT_FILE
    from centernet_ray.ray_train.loop import CHECKPOINT_SCORE

    def no_ray():
        raise AssertionError("Ray started for a finished run")

    monkeypatch.setattr("centernet_ray.ray_runtime.init_ray", no_ray)
    run = tmp_path / "runs" / "done"
    run.mkdir(parents=True)
    records = [{"checkpoint_dir_name": f"epoch_000{epoch}",
                "metrics": {"epoch": epoch, "AP": ap, "mlflow_run_id": "abc", CHECKPOINT_SCORE: ap}}
               for epoch, ap in ((1, 0.4), (2, 0.3))]
    (run / TRAIN_SNAPSHOT_FILE).write_text(json.dumps({"checkpoint_results": records,
                                                       "latest_checkpoint_result": records[1]}))
    out = tmp_path / "summary.json"
    common = ["demo", f"train.storage_path={tmp_path / 'runs'}", "train.run_name=done", "--summary-json", str(out)]
    assert main(["train", *common, "train.epochs=2"]) == 0
    summary = json.loads(out.read_text())
    assert (summary["epochs"], summary["AP"], summary["mlflow_run_id"]) == (2, 0.3, "abc")
    assert summary["checkpoint"] == str(run / "epoch_0001")  # the best by its own AP, not the latest
    assert (summary["checkpoint_epoch"], summary["checkpoint_AP"]) == (1, 0.4)  # and the table says which it is
    assert summary["trained"] is False  # wall_seconds is this command's, which trained nothing
    table = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"    wall  \d+\.\d s \(not trained again: the finished run's records\)", table[-4]), table
    assert table[-3:] == [f"    ckpt  {run / 'epoch_0001'}",
                          "          the best by its own AP: epoch 1, AP 0.4000 (the stats are epoch 2's)",
                          "  mlflow  abc"], table
    with pytest.raises(AssertionError, match="Ray started"):  # a raised train.epochs trains on
        main(["train", *common, "train.epochs=3"])


def test_a_rerun_on_another_dataset_is_refused_and_the_same_relative_path_elsewhere_is_not(tmp_path, capsys,
                                                                                           monkeypatch):
    """The finished run `done` was trained on `data.root=data` as its command wrote it (its config
    beside the checkpoint has the absolute path of where it ran). The same command from another
    folder (a Ray job's next session: `data` is another absolute path there) is its rerun and is
    answered from its records; the same settings on another dataset are refused before Ray starts,
    naming the location, instead of being answered with the other dataset's run. A run from before
    the dataset's locations were kept beside its checkpoints is not checked on them."""
    from centernet_ray import storage
    from centernet_ray.checkpoint import DATA_LOCATIONS_FILE, RUN_CONFIG_FILE
    from centernet_ray.config import load_config
    from centernet_ray.data.identity import given_data_locations
    from centernet_ray.ray_compat import TRAIN_SNAPSHOT_FILE

    monkeypatch.setattr("centernet_ray.ray_runtime.init_ray", lambda: pytest.fail("Ray started"))
    runs, first, second = tmp_path / "runs", tmp_path / "first", tmp_path / "second"
    common = ["demo", f"train.storage_path={runs}", "train.run_name=done", "train.epochs=1"]
    trained = load_config("demo", [*common[1:], "data.root=./data/"])
    (runs / "done" / "epoch_0001").mkdir(parents=True)
    record = {"checkpoint_dir_name": "epoch_0001", "metrics": {"epoch": 1, "AP": 0.5, "mlflow_run_id": "abc"}}
    (runs / "done" / TRAIN_SNAPSHOT_FILE).write_text(json.dumps({"checkpoint_results": [record],
                                                                 "latest_checkpoint_result": record}))
    first.mkdir(), second.mkdir()
    monkeypatch.chdir(first)  # where the run trained: its config holds first/data
    (runs / "done" / "epoch_0001" / RUN_CONFIG_FILE).write_text(storage.with_absolute_paths(trained).to_yaml())
    (runs / "done" / "epoch_0001" / DATA_LOCATIONS_FILE).write_text(json.dumps(given_data_locations(trained)))

    monkeypatch.chdir(second)
    assert main(["train", *common, "data.root=data"]) == 0
    capsys.readouterr()
    assert main(["train", *common, "data.root=/elsewhere/shapes"]) == 2
    err = capsys.readouterr().err
    assert "trained with other settings or data (data.root: 'data' -> '/elsewhere/shapes')" in err and "not the dataset" in err
    assert main(["train", *common]) == 2  # the synthetic shapes are another dataset too
    assert "(data.root: 'data' -> '')" in capsys.readouterr().err
    (runs / "done" / "epoch_0001" / DATA_LOCATIONS_FILE).unlink()  # a run from before: checked on its settings only
    assert main(["train", *common, "data.root=/elsewhere/shapes"]) == 0


def test_a_rerun_on_annotations_changed_in_place_is_refused_and_the_synthetic_default_is_not_hashed(
        tmp_path, capsys, monkeypatch, caplog):
    """The finished run `done` trained on `data.root=mydata`; its record beside the checkpoint is what
    the job keeps (``dataset_record``: the locations and each annotation file's sha256, from the
    ingest). Its rerun is answered from its records; after the dataset is regenerated in place
    (another seed), the same command is refused, naming both annotation files, before Ray starts;
    with the files gone they are not compared (a warning says so). A run of the synthetic default
    keeps no sha256."""
    from centernet_ray import storage
    from centernet_ray.checkpoint import DATA_LOCATIONS_FILE, RUN_CONFIG_FILE
    from centernet_ray.config import load_config
    from centernet_ray.data.identity import ANNOTATIONS_SHA256_KEYS, annotations_sha256, dataset_record, given_data_locations
    from centernet_ray.data.synthetic import write_shapes_dataset
    from centernet_ray.ray_compat import TRAIN_SNAPSHOT_FILE

    monkeypatch.setattr("centernet_ray.ray_runtime.init_ray", lambda: pytest.fail("Ray started"))
    monkeypatch.chdir(tmp_path)
    write_shapes_dataset(tmp_path / "mydata", num_train=2, num_val=2, image_size=64, seed=1)
    runs = tmp_path / "runs"
    common = ["demo", f"train.storage_path={runs}", "train.run_name=done", "train.epochs=1", "data.root=mydata"]
    trained = load_config(common[0], common[1:])
    (runs / "done" / "epoch_0001").mkdir(parents=True)
    record = {"checkpoint_dir_name": "epoch_0001", "metrics": {"epoch": 1, "AP": 0.5, "mlflow_run_id": "abc"}}
    (runs / "done" / TRAIN_SNAPSHOT_FILE).write_text(json.dumps({"checkpoint_results": [record],
                                                                 "latest_checkpoint_result": record}))
    (runs / "done" / "epoch_0001" / RUN_CONFIG_FILE).write_text(storage.with_absolute_paths(trained).to_yaml())
    annotations = {split: tmp_path / "mydata" / "annotations" / f"instances_{split}.json" for split in ("train", "val")}
    kept = dataset_record(trained.data, given_data_locations(trained), {split: hashlib.sha256(path.read_bytes()).hexdigest()
                                                          for split, path in annotations.items()})
    (runs / "done" / "epoch_0001" / DATA_LOCATIONS_FILE).write_text(json.dumps(kept))

    assert main(["train", *common]) == 0
    capsys.readouterr()
    write_shapes_dataset(tmp_path / "mydata", num_train=2, num_val=2, image_size=64, seed=2)  # the same paths
    assert main(["train", *common]) == 2
    err = capsys.readouterr().err
    old, new = kept[ANNOTATIONS_SHA256_KEYS["train"]][:12], annotations_sha256(str(annotations["train"]))[:12]
    assert (f"trained with other settings or data ({annotations['train']}: other content (sha256 {old} -> {new}); "
            f"{annotations['val']}: other content") in err and "not the dataset" in err, err
    annotations["train"].unlink(), annotations["val"].unlink()
    with caplog.at_level("WARNING", logger="centernet_ray.data.identity"):
        assert main(["train", *common]) == 0
    assert f"not comparing {annotations['train']} with the annotations recorded for this name" in caplog.text
    for synthetic in (load_config("demo"), load_config("demo", ["data.train_images=mydata/images/train"])):  # half given
        assert dataset_record(synthetic.data, given_data_locations(synthetic), {}) == given_data_locations(synthetic)


def test_bad_arguments_exit_2_with_a_message_that_names_them(tmp_path, capsys, monkeypatch):
    """Every command: status 2 and one line for what the user gave wrong, before anything starts
    (export's status 1 stays "the check failed")."""
    monkeypatch.chdir(tmp_path)
    for argv, flag in ((["predict", "--checkpoint", "c.pt", "--images", ".", "--output", "o", "--actors", "0"],
                        "argument --actors: must be at least 1, got 0"),
                       (["export", "--checkpoint", "c.pt", "--output", "o", "--max-detections", "0"],
                        "argument --max-detections: must be at least 1"),
                       (["data", "show", "--annotations", "a.json", "--images", ".", "--out", "g.png", "--count", "-1"],
                        "argument --count: must be at least 1"),
                       (["data", "synth", "--out", "d", "--seed", "-1"], "argument --seed: must be at least 0"),
                       (["data", "synth", "--out", "d", "--image-size", "8"], "argument --image-size: must be at least 32")):
        with pytest.raises(SystemExit) as exited:  # argparse's own exit
            main(argv)
        assert exited.value.code == 2 and flag in capsys.readouterr().err
    assert main(["export", "--checkpoint", "c.pt", "--output", "o", "--images", "."]) == 2
    assert capsys.readouterr().err == ("error: --images and --annotations go together: the validation images and "
                                       "their instances json\n")
    (tmp_path / "detections.json").write_text("[]")
    assert main(["eval", "--annotations", "missing.json", "--detections", "detections.json"]) == 2
    assert capsys.readouterr().err == "error: annotation file not found: missing.json\n"
    assert main(["eval", "--annotations", "missing.json", "--detections", "nothing.json"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read detections nothing.json: ")
    (tmp_path / "file").write_text("")
    assert main(["train", "--summary-json", "file/s.json"]) == 2  # before Ray starts, not after the run
    assert capsys.readouterr().err.startswith("error: --summary-json file/s.json: cannot create its folder")
    started = []  # a mistyped checkpoint of serve and predict: answered before Ray starts (was ~10 s after)
    monkeypatch.setattr("centernet_ray.ray_runtime.init_ray", lambda: started.append(True))
    assert main(["serve", "--checkpoint", "c.pt"]) == 2
    missing = f"error: no checkpoint at {tmp_path / 'c.pt'}"
    assert capsys.readouterr().err == f"{missing} here (the replicas read it on their nodes)\n"
    assert main(["predict", "--checkpoint", "c.pt", "--images", ".", "--output", "o"]) == 2
    assert capsys.readouterr().err == f"{missing}\n" and not started


def test_an_interrupted_training_run_says_how_to_resume_and_exits_130(capsys, monkeypatch):
    """Ctrl+C during `centernet-ray train` (the run itself: test_train_integration.py): the job's
    message on stderr, exit status 130 as a shell gives a command stopped by SIGINT."""
    from centernet_ray.ray_train.job import TrainingInterrupted

    def interrupted(config, **kwargs):
        raise TrainingInterrupted("training run demo interrupted: its latest checkpoint is epoch 5 in /runs/epoch_0005: "
                                  "rerun the same command to resume from it")

    monkeypatch.setattr("centernet_ray.ray_runtime.init_ray", lambda: None)
    monkeypatch.setattr("centernet_ray.ray_train.job.run_training", interrupted)
    assert main(["train", "demo"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: training run demo interrupted: its latest checkpoint is epoch 5") and \
        err.rstrip().endswith("rerun the same command to resume from it")


@pytest.mark.parametrize("command, runner", [("train", "centernet_ray.ray_train.job.run_training"),
                                             ("tune", "centernet_ray.ray_tune.sweep.run_sweep")])
def test_sigterm_stops_a_run_or_sweep_as_ctrl_c_does(capsys, monkeypatch, command, runner):
    """`ray job stop`, Kubernetes and `kill` send SIGTERM: `train` and `tune` raise SIGINT instead, so
    the run's own Ctrl+C handler (Ray Train's, Tune's) stops it resumably (the real one:
    test_tune_integration.py stops a sweep with SIGTERM); before there is one (Ctrl+C during the
    ingest), the command says "interrupted" and exits 130, with no traceback."""
    import signal
    import time

    seen = []

    def run(*args, **kwargs):
        signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))  # the run's handler
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # Python runs the handlers between bytecodes
        signal.signal(signal.SIGINT, signal.default_int_handler)  # no handler of the run's yet
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr("centernet_ray.ray_runtime.init_ray", lambda: None)
    monkeypatch.setattr(runner, run)
    try:
        assert main([command, "demo" if command == "train" else "tune/demo"]) == 130
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert seen == [signal.SIGINT] and capsys.readouterr().err == "interrupted\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handler does not outlive it


def test_sigterm_stops_a_command_whose_sigint_is_ignored(capsys, monkeypatch):
    """A background job of a script (`centernet-ray train ... &`) starts with SIGINT ignored: SIGTERM
    still stops it."""
    import signal
    import time

    def run(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr("centernet_ray.ray_runtime.init_ray", lambda: None)
    monkeypatch.setattr("centernet_ray.ray_train.job.run_training", run)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["train", "demo"]) == 130
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert capsys.readouterr().err == "interrupted\n"


def test_the_ray_job_entry_points_print_plain_text_when_stdout_is_not_a_terminal():
    """`python -m tune.sweep` / `pipelines.ingest` / `pipelines.predict` (what `ray job submit` runs)
    make their output plain as `centernet-ray` does: their logs are read with `ray job logs`."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for module in ("tune.sweep", "pipelines.ingest", "pipelines.predict"):
        probe = (f"import os, runpy, sys\nsys.argv = [{module!r}, '--help']\n"
                 f"try:\n    runpy.run_module({module!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
                 "print('probe:', type(sys.stdout).__name__, os.environ.get('RAY_COLOR_PREFIX'))")
        env = {k: v for k, v in os.environ.items() if k != "RAY_COLOR_PREFIX"}
        out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True,
                             check=True).stdout
        assert out.splitlines()[-1] == "probe: PlainTextStream 0", (module, out[-500:])


def test_config_list_sets_the_search_spaces_apart_and_one_given_as_a_config_says_what_it_is(capsys):
    assert main(["config", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "demo" in lines and "tune/demo" in lines and "tune/search_space" not in lines
    assert lines[-1] == "search spaces (centernet-ray tune --search-space NAME): tune/search_space"
    assert main(["config", "tune/search_space"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'loss.alpha' in config" in err and "dotted keys are a search space's" in err


def test_serve_flags_reach_the_config_as_typed():
    """`--host ::` (every IPv6 address) was read by YAML as a mapping; a keys file with `#` in its
    name was cut at the `#` as a comment."""
    from centernet_ray.cli import _serve_flag_overrides, build_parser
    from centernet_ray.config import load_config

    args = build_parser().parse_args(["serve", "--checkpoint", "c.pt", "--host", "::", "--port", "8100",
                                      "--api-keys-file", "/keys #prod", "--max-batch-size", "4"])
    serve = load_config(None, _serve_flag_overrides(args)).serve
    assert (serve.host, serve.port, serve.api_keys_file, serve.max_batch_size) == ("::", 8100, "/keys #prod", 4)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path, buffered):
    """`centernet-ray config demo | head -1`: when the reader of stdout is gone before the command
    writes, the command stops with status 1 and nothing on stderr (it showed a BrokenPipeError
    traceback, which the CLI keeps for faults of the program). Block-buffered stdout fails at the
    last flush, unbuffered at the first write."""
    env = {**os.environ, "PYTHONUNBUFFERED": "" if buffered else "1"}
    process = subprocess.Popen([sys.executable, "-m", "centernet_ray", "config", "demo"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader leaves before the command's first line
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 1 and stderr == "", stderr[-2000:]
