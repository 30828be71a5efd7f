import pytest
import torch

from centernet_ray.model.dla import DLA34, DLAUpNeck
from centernet_ray.model.pretrained import load_dla34_imagenet

pytestmark = pytest.mark.heavy_model


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def trunk():
    torch.manual_seed(0)
    return DLA34().eval()


@pytest.mark.parametrize("deformable", [True, False])
@pytest.mark.parametrize("size", [(512, 512), (96, 160)])
def test_neck_output_is_64_channels_at_stride_4(trunk, size, deformable):
    neck = DLAUpNeck(deformable=deformable).eval()
    with torch.no_grad():
        levels = trunk(torch.randn(1, 3, *size))
        out = neck(levels)
    assert [tuple(level.shape[1:]) for level in levels] == [
        (c, size[0] // 2 ** i, size[1] // 2 ** i) for i, c in enumerate(DLA34.channels)]
    assert neck.out_channels == 64
    assert out.shape == (1, 64, size[0] // 4, size[1] // 4)


def test_sides_that_are_not_multiples_of_32_are_refused(trunk):
    with pytest.raises(ValueError, match="multiples of 32"):
        trunk(torch.randn(1, 3, 96, 100))


def test_parameter_counts_match_the_official_dla34_model():
    trunk, neck, plain = DLA34(), DLAUpNeck(deformable=True), DLAUpNeck(deformable=False)
    heads = 3 * (64 * 256 * 9 + 256) + (256 * 80 + 80) + 2 * (256 * 2 + 2)  # head_conv 256, 80 classes
    imagenet_classifier = 512 * 1000 + 1000  # the official model keeps it (unused) after loading ImageNet weights
    print(f"DLA34 {_parameters(trunk):,}  DLA-Up/IDA-Up deformable {_parameters(neck):,}  plain "
          f"{_parameters(plain):,}")
    assert _parameters(trunk) == 15_270_832
    assert _parameters(neck) == 3_940_336
    assert _parameters(plain) == 3_300_608
    # the official CenterNet dla_34 ctdet model has about 20.2M parameters
    assert _parameters(trunk) + _parameters(neck) + heads + imagenet_classifier == pytest.approx(20.2e6, rel=0.01)


def test_upsampling_starts_as_bilinear_interpolation():
    neck = DLAUpNeck(deformable=False)
    x = torch.randn(1, 64, 6, 10)
    up4 = neck.ida_up.up[1]  # x4
    expected = torch.nn.functional.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    with torch.no_grad():
        # borders differ (zero padding vs edge clamping); the interior is exact bilinear
        assert torch.allclose(up4(x)[..., 4:-4, 4:-4], expected[..., 4:-4, 4:-4], atol=1e-5)


def test_gradients_reach_the_deformable_offsets_and_every_trained_parameter():
    torch.manual_seed(0)
    trunk, neck = DLA34(), DLAUpNeck(deformable=True)
    out = neck(trunk(torch.randn(2, 3, 64, 64)))
    (out * torch.randn_like(out)).sum().backward()
    offsets = neck.ida_up.node[-1][0].offset_mask.weight
    assert offsets.grad is not None and offsets.grad.abs().sum() > 0
    without_grad = [name for module in (trunk, neck) for name, p in module.named_parameters()
                    if p.requires_grad and p.grad is None]
    assert without_grad == []


def test_the_unused_official_projections_are_frozen():
    frozen = [name for name, p in DLA34().named_parameters() if not p.requires_grad]
    assert sorted({name.rsplit(".", 2)[0] for name in frozen}) == ["level3.project", "level4.project"]


def _official_style_state(trunk: DLA34) -> dict[str, torch.Tensor]:
    state = {key: value.clone() for key, value in trunk.state_dict().items()}
    state["fc.weight"] = torch.randn(1000, 512, 1, 1)
    state["fc.bias"] = torch.randn(1000)
    return state


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    b_state = b.state_dict()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b_state[key]), key


@pytest.mark.parametrize("layout", ["bare", "module_prefix", "state_dict_entry", "no_bn_counters"])
def test_imagenet_weights_load_exactly(tmp_path, layout):
    torch.manual_seed(1)
    reference = DLA34()
    for bn in (m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_()
    state = _official_style_state(reference)
    if layout == "module_prefix":
        state = {f"module.{key}": value for key, value in state.items()}
    elif layout == "no_bn_counters":  # as in files saved before PyTorch 0.4.1, like the DLA authors'
        state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    path = tmp_path / "dla34.pth"
    # the authors' file predates PyTorch 1.6's zip format: its loader reads with readline()
    legacy = {"_use_new_zipfile_serialization": False} if layout == "no_bn_counters" else {}
    torch.save({"state_dict": state} if layout == "state_dict_entry" else state, path, **legacy)
    trunk = DLA34()
    load_dla34_imagenet(trunk, str(path))
    if layout == "no_bn_counters":
        for module in (trunk, reference):
            for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
                bn.num_batches_tracked.zero_()
    _assert_same_weights(reference, trunk)


def test_a_weights_file_missing_on_a_worker_s_node_names_the_node():
    import socket

    from centernet_ray.errors import UserInputError

    with pytest.raises(UserInputError, match=f"no weights file /nowhere/dla34.pth on {socket.gethostname()} "):
        load_dla34_imagenet(DLA34(), "/nowhere/dla34.pth")


def test_weights_with_a_wrong_shape_are_refused_by_name(tmp_path):
    state = _official_style_state(DLA34())
    state["level5.root.conv.weight"] = torch.zeros(512, 1024, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"wrong shape.*level5\.root\.conv\.weight"):
        load_dla34_imagenet(DLA34(), str(tmp_path / "bad.pth"))


def test_weights_with_a_missing_key_are_refused_by_name(tmp_path):
    state = _official_style_state(DLA34())
    del state["level2.tree1.conv1.weight"]
    torch.save(state, tmp_path / "bad.pth")
    trunk = DLA34()
    before = trunk.level0[0].weight.clone()
    with pytest.raises(ValueError, match=r"missing.*level2\.tree1\.conv1\.weight"):
        load_dla34_imagenet(trunk, str(tmp_path / "bad.pth"))
    assert torch.equal(trunk.level0[0].weight, before)  # nothing was half-loaded
