"""The EMA of the weights: the warm-up decay, the update against hand-computed values, the engine
evaluating with it, and checkpoints carrying it (resumed, and loaded by inference)."""

import math

import pytest
import torch
from torch import nn

from centernet_ray.checkpoint import checkpoint_state, load_checkpoint, model_from_checkpoint, save_checkpoint
from centernet_ray.config import load_config
from centernet_ray.training.ema import WeightAverage, ema_decay
from centernet_ray.training.engine import TrainingEngine
from test_engine import OVERRIDES, tiny_batch


def test_the_decay_ramps_up_as_in_yolox():
    assert ema_decay(1, 0.9998, 2000) == pytest.approx(0.9998 * (1 - math.exp(-1 / 2000)))
    assert ema_decay(2000, 0.9998, 2000) == pytest.approx(0.9998 * (1 - math.exp(-1)))
    assert ema_decay(100_000, 0.9998, 2000) == pytest.approx(0.9998, rel=1e-12)


def test_updates_follow_the_formula_for_parameters_and_buffers():
    """w_ema <- d * w_ema + (1 - d) * w, d = ema_decay(t); the first update copies (d(1) ~ 0 anyway).
    Tolerance: float32 lerp, 1e-6 relative."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average = WeightAverage(model, decay=0.9, tau=2.0)
    expected = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for t in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(t))
            model[1].running_mean.add_(1.0)
        average.update(model)
        d = 0.0 if t == 1 else ema_decay(t, 0.9, 2.0)
        for key, value in model.state_dict().items():
            if key in expected:
                expected[key] = d * expected[key] + (1 - d) * value
    assert average.updates == 4
    for key, value in average.module.state_dict().items():
        if key in expected:
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-6)


def test_the_engine_evaluates_the_average_and_checkpoints_restore_it(tmp_path):
    torch.manual_seed(0)
    config = load_config(None, [*OVERRIDES, "train.ema=true", "train.ema_decay=0.99", "train.ema_tau=1"])
    engine = TrainingEngine(config, num_classes=2, steps_per_epoch=10)
    for seed in range(3):
        engine.step(tiny_batch(seed))
    assert engine.ema.updates == 3 and engine.evaluated_module is engine.ema.module
    assert engine.detector().model is engine.ema.module
    trained, averaged = engine.module.state_dict(), engine.ema.module.state_dict()
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained)

    state = checkpoint_state(engine.model, config, ["a", "b"], [1, 2], 1, engine.optimizer, engine.scheduler,
                             engine.scaler, ema=engine.ema.state_dict())
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    restored = model_from_checkpoint(tmp_path / "checkpoint.pt")  # inference loads the average
    for key, value in restored.model.state_dict().items():
        assert torch.equal(value, averaged[key]), key
    resumed = TrainingEngine(config, num_classes=2, steps_per_epoch=10)
    resumed.load_state(load_checkpoint(tmp_path / "checkpoint.pt"), steps_per_epoch=10)
    assert resumed.ema.updates == 3
    for key, value in resumed.module.state_dict().items():  # training resumes from the trained weights
        assert torch.equal(value, trained[key]), key
    for key, value in resumed.ema.module.state_dict().items():
        assert torch.equal(value, averaged[key]), key


def test_without_ema_nothing_changes():
    engine = TrainingEngine(load_config(None, OVERRIDES), num_classes=2, steps_per_epoch=10)
    assert engine.ema is None and engine.evaluated_module is engine.module


def test_bad_ema_settings_are_refused():
    from centernet_ray.config import ConfigError

    with pytest.raises(ConfigError, match="ema_decay"):
        load_config(None, ["train.ema_decay=1.5"])
