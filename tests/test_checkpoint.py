import numpy as np
import pytest
import torch

from centernet_ray.checkpoint import (checkpoint_state, inference_state, load_checkpoint, model_from_checkpoint,
                                      save_checkpoint)
from centernet_ray.config import load_config
from centernet_ray.detector import Detector, letterbox_batch
from centernet_ray.errors import UserInputError
from centernet_ray.model import build_model


def test_checkpoint_round_trips_with_weights_only(tmp_path):
    config = load_config(None, ["model.neck_channels=[32,32,32]", "model.head_conv=16", "data.input_size=[64,64]"])
    model = build_model(config.model, 3)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = checkpoint_state(model, config, ["a", "b", "c"], [3, 5, 9], epoch=7, optimizer=optimizer,
                             scheduler=scheduler, scaler=scaler, metrics={"AP": 0.5})
    save_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", state)
    loaded = load_checkpoint(tmp_path / "ckpt")  # a directory holding checkpoint.pt works too
    assert loaded["epoch"] == 7 and loaded["category_ids"] == [3, 5, 9] and loaded["metrics"] == {"AP": 0.5}
    restored = model_from_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")
    assert restored.config == config and restored.class_names == ["a", "b", "c"]
    for key, value in model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[key], value)


def test_the_inference_state_is_the_model_without_what_only_a_resume_needs(tmp_path):
    """The run's MLflow artifact: a third of the file for Adam (its two moments per weight are gone)."""
    config = load_config(None, ["model.neck_channels=[32,32,32]", "model.head_conv=16", "data.input_size=[64,64]"])
    model = build_model(config.model, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 3, 64, 64))["heatmap"].sum().backward()
    optimizer.step()  # Adam's moments exist from the first step
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5)
    state = checkpoint_state(model, config, ["a", "b", "c"], [3, 5, 9], epoch=7, optimizer=optimizer,
                             scheduler=scheduler, scaler=torch.amp.GradScaler("cpu", enabled=False))
    save_checkpoint(tmp_path / "full.pt", state)
    save_checkpoint(tmp_path / "served.pt", inference_state(state))
    served = load_checkpoint(tmp_path / "served.pt")
    assert served["optimizer"] is None and served["scheduler"] is None and served["scaler"] is None
    assert state["optimizer"] is not None  # the state itself is not changed
    assert (tmp_path / "served.pt").stat().st_size < 0.4 * (tmp_path / "full.pt").stat().st_size
    restored = model_from_checkpoint(tmp_path / "served.pt")
    assert restored.class_names == ["a", "b", "c"]
    for key, value in model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[key], value)


class _RunsCode:
    """Unpickling it would write a file: what a malicious checkpoint does with pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"schema_version": 1, "model": _RunsCode(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="holds Python objects beyond tensors and plain data"):
        load_checkpoint(tmp_path / "evil.pt")  # weights_only=True: the pickle's callable is never called
    assert not marker.exists()


def test_foreign_or_missing_checkpoints_are_refused(tmp_path):
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a centernet-ray checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "other.pt").read_bytes()[:200])  # a copy cut short
    with pytest.raises(UserInputError, match=r"cut.pt is not a centernet-ray checkpoint: not a readable torch.save "
                                             r"file \(truncated, or another format: RuntimeError: "):
        load_checkpoint(tmp_path / "cut.pt")
    run = tmp_path / "runs" / "centernet-resnet18"  # a run's folder given for one of its checkpoints
    for epoch in (4, 5):
        (run / f"epoch_000{epoch}").mkdir(parents=True)
        (run / f"epoch_000{epoch}" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(UserInputError, match=r"centernet-resnet18 is a training run's folder, not one of its "
                                             r"checkpoints: give one of epoch_0004, epoch_0005 \(its summary names "
                                             r"the best\), e.g. .*centernet-resnet18/epoch_0005$"):
        load_checkpoint(run)
    with pytest.raises(UserInputError, match="runs holds no checkpoint.pt: give a checkpoint file or a folder"):
        load_checkpoint(tmp_path / "runs")
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(UserInputError, match=r"notes.pt is not a centernet-ray checkpoint: not a readable"):
        load_checkpoint(tmp_path / "notes.pt")


@pytest.mark.parametrize("change, message", [
    (lambda state: state.pop("config"), r"k.pt is a centernet-ray checkpoint without config$"),
    (lambda state: state.update(category_ids=[1, 2]), r"k.pt: 3 class names and 2 category ids: they map one to one"),
    (lambda state: state["config"]["model"].update(old_key=1),  # written by another version
     r"^the checkpoint's config is not one this version of centernet-ray reads: unknown key 'model.old_key'"),
    (lambda state: state["config"]["model"].update(head_conv=32),
     r"^the checkpoint's weights do not fit the resnet18 of its config with 3 classes: wrong shape \(\d+\): heatmap"),
    (lambda state: state.update(ema={"decay": 0.9}), "the checkpoint's EMA weights are a NoneType, not a state dict"),
])
def test_a_checkpoint_whose_contents_do_not_fit_is_a_one_line_error(tmp_path, change, message):
    """Each was a KeyError or a RuntimeError of load_state_dict, from `serve`, `predict` or `export`."""
    config = load_config(None, ["model.neck_channels=[32,32,32]", "model.head_conv=16", "data.input_size=[64,64]"])
    state = checkpoint_state(build_model(config.model, 3), config, ["a", "b", "c"], [3, 5, 9], epoch=1)
    change(state)
    save_checkpoint(tmp_path / "k.pt", state)
    with pytest.raises(UserInputError, match=message):
        model_from_checkpoint(tmp_path / "k.pt")


def test_detector_returns_boxes_in_original_pixels(untrained_checkpoint):
    detector, loaded = Detector.from_checkpoint(str(untrained_checkpoint))
    images = [torch.randint(0, 255, (3, 100, 60), dtype=torch.uint8), torch.randint(0, 255, (3, 40, 80), dtype=torch.uint8)]
    found = detector.detect_images(images, k=20)
    assert len(found) == 2 and found[0].boxes.shape == (20, 4)
    assert found[0].boxes[:, [0, 2]].max() <= 60 and found[0].boxes[:, [1, 3]].max() <= 100
    assert found[1].boxes[:, [0, 2]].max() <= 80 and found[1].boxes[:, [1, 3]].max() <= 40
    assert (found[0].scores[:-1] >= found[0].scores[1:]).all()
    flip_detector = Detector(loaded.model, (64, 64), flip_test=True)
    assert len(flip_detector.detect_images(images[:1], k=5)[0].scores) == 5
    # each box goes through its image's input-to-original mapping: identity, then x2 and shifted by
    # (5, 7), in an original large enough that nothing is clipped
    batch = letterbox_batch(images[:1], (64, 64))
    identity, scaled = torch.tensor([[[1.0, 0, 0], [0, 1, 0]]]), torch.tensor([[[2.0, 0, 5], [0, 2, 7]]])
    large = torch.tensor([[1000, 1000]])
    plain = detector.detect(batch.images, identity, large, k=20)[0]
    moved = detector.detect(batch.images, scaled, large, k=20)[0]
    np.testing.assert_allclose(moved.boxes, 2 * plain.boxes + np.array([5, 7, 5, 7]), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(moved.scores, plain.scores)
    assert plain.boxes[:, 2:].max() <= 64  # the network input's pixels: 16x16 output map x stride 4


def test_a_resume_may_change_how_long_and_how_fast_a_run_trains_not_what_it_learns():
    from centernet_ray.checkpoint import changed_settings
    from centernet_ray.config import load_config

    trained = load_config("coco_resnet18")
    same = load_config("coco_resnet18", ["train.epochs=20", "train.time_limit=900", "data.preprocess_max_actors=8",
                                         "train.eval_every=1", "tracking.experiment=other", "serve.port=9000",
                                         "model.pretrained=/other/folder/w.pth"])
    assert changed_settings(trained, same) == []
    changed = load_config("coco_resnet18", ["loss.alpha=3", "train.num_workers=2", "model.head_conv=16"])
    assert changed_settings(trained, changed) == ["loss.alpha: 2.0 -> 3.0", "model.head_conv: 64 -> 16",
                                                  "train.num_workers: 4 -> 2"]
