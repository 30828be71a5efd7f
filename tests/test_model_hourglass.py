import numpy as np
import pytest
import torch

from centernet_ray.losses import CenterNetLoss
from centernet_ray.model import HEATMAP_PRIOR_BIAS
from centernet_ray.model.hourglass import HourglassCenterNet
from centernet_ray.targets import encode_targets

pytestmark = pytest.mark.heavy_model

NUM_CLASSES = 80


@pytest.fixture(scope="module")
def model():
    # Built once: ~191M parameters take seconds to initialise. Tests set train/eval themselves.
    torch.manual_seed(0)
    return HourglassCenterNet(NUM_CLASSES, head_conv=256, num_stacks=2)


@pytest.fixture(scope="module")
def train_outputs(model):
    # One training-mode forward shared by the tests that need one (each costs seconds on CPU).
    # 128x256, not 128x128: at batch 1 a 128x128 input reaches the bottom level as 1x1, and
    # BatchNorm cannot take training statistics over a single value per channel.
    model.train()
    return model(torch.randn(1, 3, 128, 256))


def _assert_stride_4(out, height, width):
    assert set(out) == {"heatmap", "size", "offset"}
    assert out["heatmap"].shape == (1, NUM_CLASSES, height // 4, width // 4)
    assert out["size"].shape == (1, 2, height // 4, width // 4)
    assert out["offset"].shape == (1, 2, height // 4, width // 4)


def test_training_mode_returns_the_last_stack_with_the_first_under_aux(train_outputs):
    assert isinstance(train_outputs, dict) and set(train_outputs) == {"heatmap", "size", "offset", "aux"}
    assert isinstance(train_outputs["aux"], list) and len(train_outputs["aux"]) == 1
    for out in [{k: v for k, v in train_outputs.items() if k != "aux"}, *train_outputs["aux"]]:
        _assert_stride_4(out, 128, 256)


@pytest.mark.parametrize("height,width", [(128, 128), (128, 256)])
def test_eval_mode_returns_the_last_stack_only(model, height, width):
    model.eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 3, height, width))
    assert isinstance(out, dict)
    _assert_stride_4(out, height, width)


def test_512_input_gives_128_output(model):
    model.eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 512, 512))
    _assert_stride_4(out, 512, 512)


@pytest.mark.parametrize("height,width", [(100, 128), (128, 192)])
def test_size_not_a_multiple_of_128_is_rejected(model, height, width):
    model.eval()
    with pytest.raises(ValueError, match=rf"multiples of 128.*{height}x{width}"):
        model(torch.zeros(1, 3, height, width))


def test_parameter_count_matches_official_hourglass_104(model):
    count = sum(p.numel() for p in model.parameters())
    print(f"Hourglass-104 CenterNet, {NUM_CLASSES} classes, head_conv 256: {count:,} parameters")
    assert count == 191_284_008  # a stage or block more or less moves it by 0.3M or more
    assert count == pytest.approx(190e6, rel=0.01)  # the official ctdet HG-104 model: about 190M


def test_heatmap_bias_starts_at_prior_in_every_stack(model):
    for heads in model.heads:
        assert torch.allclose(heads["heatmap"][2].bias, torch.full((NUM_CLASSES,), HEATMAP_PRIOR_BIAS))


def test_intermediate_supervision_reaches_the_first_stack(model, train_outputs):
    encoded = encode_targets(np.array([[4.0, 6.0, 20.0, 26.0]]), np.array([3]), NUM_CLASSES, (32, 64))
    targets = {k: torch.as_tensor(encoded[k])[None] for k in ("heatmap", "index", "mask", "size", "offset")}
    criterion = CenterNetLoss()
    params = dict(model.named_parameters())

    model.zero_grad(set_to_none=True)
    criterion(train_outputs["aux"][0], targets)["total"].backward(retain_graph=True)
    reached = {name for name, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("stem.") for n in reached)
    assert any(n.startswith("hourglasses.0.") for n in reached) and any(n.startswith("heads.0.") for n in reached)
    assert not any(n.startswith(("hourglasses.1.", "features.1.", "heads.1.", "merge_")) for n in reached)
    model.zero_grad(set_to_none=True)

    # Only the heads are asked for, so autograd skips the (already shown) trip down the stacks.
    heads = {name: p for name, p in params.items() if name.startswith("heads.")}
    grads = torch.autograd.grad(criterion(train_outputs, targets)["total"], list(heads.values()), retain_graph=True)
    reached = {name for name, g in zip(heads, grads) if g.abs().sum() > 0}
    assert any(n.startswith("heads.0.") for n in reached) and any(n.startswith("heads.1.") for n in reached)
