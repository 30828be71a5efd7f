import json
import subprocess
import sys

from centernet_ray.cli import main


def test_data_synth_writes_the_coco_layout(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--train-images", "3", "--val-images", "2", "--image-size", "64"]) == 0
    assert len(list((tmp_path / "images" / "train").glob("*.jpg"))) == 3
    assert (tmp_path / "annotations" / "instances_val.json").is_file()


def test_data_check_and_show(shapes_dataset, tmp_path, capsys):
    ann = str(shapes_dataset / "annotations" / "instances_val.json")
    images = str(shapes_dataset / "images" / "val")
    assert main(["data", "check", "--annotations", ann, "--images", images]) == 0
    assert "images: 12" in capsys.readouterr().out
    assert main(["data", "show", "--annotations", ann, "--images", images, "--out", str(tmp_path / "g.png"), "--count", "4"]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0


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


def test_config_command_prints_yaml_with_overrides(capsys):
    assert main(["config", "loss.alpha=3"]) == 0
    assert "alpha: 3.0" in capsys.readouterr().out


def test_bad_override_exits_2_with_a_message(capsys):
    assert main(["config", "loss.alhpa=3"]) == 2
    assert "valid keys: alpha, beta" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "centernet_ray", "--help"], capture_output=True, text=True, check=True)
    assert "data" in result.stdout and "eval" in result.stdout


def test_tune_reports_a_bad_search_space_before_starting_anything(tmp_path, capsys):
    from centernet_ray.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("loss.alhpa: {uniform: [1, 2]}\n")
    assert main(["tune", "--search-space", str(space), "tune.num_samples=2"]) == 2
    assert "loss.alhpa: unknown config key" in capsys.readouterr().err


def test_overrides_may_follow_options(tmp_path, capsys):
    import pytest

    from centernet_ray.cli import main

    assert main(["config", "loss.alpha=2.5"]) == 0
    assert "alpha: 2.5" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["tune", "--search-space", "x.yaml", "--nonsense"])


def test_user_errors_are_one_line_and_program_faults_keep_their_traceback(tmp_path, capsys, monkeypatch):
    import pytest
    import torch

    import centernet_ray.cli as cli

    monkeypatch.setattr("centernet_ray.ray_runtime.init_ray", lambda: None)  # fails before it needs Ray
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")  # a checkpoint of something else
    assert main(["predict", "--checkpoint", str(tmp_path / "other.pt"), "--images", str(tmp_path),
                 "--output", str(tmp_path / "out")]) == 2
    assert "is not a centernet-ray checkpoint" in capsys.readouterr().err

    def broken(args):
        raise ValueError("an internal invariant broke")  # e.g. from torch, deep inside a command

    monkeypatch.setattr(cli, "_cmd_config", broken)
    with pytest.raises(ValueError, match="internal invariant"):  # not swallowed into "error: ..."
        main(["config"])


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
