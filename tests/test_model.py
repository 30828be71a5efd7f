import pytest
import torch

from centernet_ray.config import ConfigError, ModelConfig, load_config
from centernet_ray.losses import CenterNetLoss
from centernet_ray.errors import UserInputError
from centernet_ray.model import HEATMAP_PRIOR_BIAS, build_model
from centernet_ray.model.pretrained import load_resnet_imagenet
from centernet_ray.model.resnet import resnet_trunk


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_heads_come_out_at_stride_4(backbone):
    model = build_model(ModelConfig(backbone=backbone), num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 96))
    assert out["heatmap"].shape == (1, 5, 32, 24)
    assert out["size"].shape == (1, 2, 32, 24) and out["offset"].shape == (1, 2, 32, 24)


def test_deformable_neck_runs_and_backpropagates():
    model = build_model(ModelConfig(backbone="resnet18", deformable=True, neck_channels=(64, 32, 32)), 2)
    out = model(torch.randn(2, 3, 64, 64))
    out["heatmap"].sum().backward()
    offsets = model.neck.stages[0][0].offset_mask.weight
    assert out["heatmap"].shape == (2, 2, 16, 16) and offsets.grad.abs().sum() > 0


def test_heatmap_bias_starts_at_prior():
    model = build_model(ModelConfig(), 3)
    assert torch.allclose(model.heatmap[2].bias, torch.full((3,), HEATMAP_PRIOR_BIAS))
    assert torch.sigmoid(torch.tensor(HEATMAP_PRIOR_BIAS)).item() == pytest.approx(0.1, abs=1e-3)


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelConfig(pretrained=str(path)), 2)
    assert torch.equal(model.backbone[0].weight, reference.conv1.weight)
    assert torch.equal(model.backbone[7][1].conv2.weight, reference.layer4[1].conv2.weight)
    from_uri = build_model(ModelConfig(pretrained=f"file://{path}"), 2)  # object storage: s3://, gs://
    assert torch.equal(from_uri.backbone[0].weight, reference.conv1.weight)


def test_pretrained_weights_that_do_not_fit_are_refused_naming_what_and_load_nothing(tmp_path):
    import torchvision

    trunk = resnet_trunk("resnet18")
    before = trunk[0].weight.clone()
    resnet50 = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), resnet50)
    with pytest.raises(UserInputError, match=r"resnet50.pth does not fit resnet18 \(expected torchvision's resnet18 "
                       r"weights; model.pretrained=null trains from scratch\): unexpected \(198\): "
                       r"layer1\.0\.conv3\.weight, .*; wrong shape \(23\): "
                       r"layer1\.0\.conv1\.weight \(64, 64, 1, 1\) \(the model's \(64, 64, 3, 3\)\)"):
        load_resnet_imagenet(trunk, "resnet18", str(resnet50))
    assert torch.equal(trunk[0].weight, before)  # nothing was half-loaded

    truncated = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:4096])  # an interrupted download
    with pytest.raises(UserInputError, match=r"resnet18.pth is not resnet18 weights: not a readable torch.save file "
                       r"\(truncated, or another format: RuntimeError: PytorchStreamReader failed"):
        load_resnet_imagenet(trunk, "resnet18", str(truncated))

    not_weights = tmp_path / "steps.pth"
    torch.save({"steps": [1, 2, 3]}, not_weights)
    with pytest.raises(UserInputError, match="steps.pth is not resnet18 weights: it holds a dict that is not a "
                                             "state dict of tensors"):
        load_resnet_imagenet(trunk, "resnet18", str(not_weights))


def test_a_weights_name_is_checked_without_downloading_anything():
    from centernet_ray.model.pretrained import check_weights_name

    check_weights_name(load_config(None, ["model.pretrained=IMAGENET1K_V1"]).model)  # resnet18's
    check_weights_name(load_config(None, ["model.backbone=resdcn18", "model.pretrained=DEFAULT"]).model)
    with pytest.raises(UserInputError, match=r"'IMAGENET1K_V3' is neither an existing file nor a torchvision weights "
                                             r"name for resnet18 \(IMAGENET1K_V1, DEFAULT\)"):
        check_weights_name(load_config(None, ["model.pretrained=IMAGENET1K_V3"]).model)
    with pytest.raises(UserInputError, match="dla34 loads the DLA authors' ImageNet weights from a file"):
        check_weights_name(load_config(None, ["model.backbone=dla34", "model.pretrained=IMAGENET1K_V1"]).model)


def test_unknown_pretrained_name_says_what_is_valid():
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        build_model(ModelConfig(pretrained="NOT_A_WEIGHT"), 2)


def test_two_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig(neck_channels=(64, 32, 32), head_conv=32), 2)
    heat = torch.zeros(2, 2, 16, 16)
    heat[0, 0, 5, 5] = heat[1, 1, 9, 3] = 1.0
    targets = {"heatmap": heat, "index": torch.tensor([[85], [147]]), "mask": torch.ones(2, 1),
               "size": torch.full((2, 1, 2), 4.0), "offset": torch.full((2, 1, 2), 0.5)}
    criterion = CenterNetLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.randn(2, 3, 64, 64)
    losses = []
    for _ in range(3):
        terms = criterion(model(images), targets)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        losses.append(terms["total"].item())
    assert losses[2] < losses[0]


def test_bf16_autocast_forward_is_finite():
    model = build_model(ModelConfig(neck_channels=(64, 32, 32), head_conv=32), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    assert all(torch.isfinite(v.float()).all() for v in out.values())


def test_backbone_width_scales_channels_and_parameters():
    full = build_model(ModelConfig(neck_channels=(64, 32, 32), head_conv=16), 2)
    half = build_model(ModelConfig(width=0.5, neck_channels=(64, 32, 32), head_conv=16), 2)
    count = lambda m: sum(p.numel() for p in m.backbone.parameters())  # noqa: E731
    assert 3.5 < count(full) / count(half) < 4.5  # conv parameters scale with width squared
    assert half.backbone[7][1].conv2.out_channels == 256
    assert half(torch.randn(1, 3, 64, 64))["heatmap"].shape == (1, 2, 16, 16)
    with pytest.raises(ConfigError, match=r"model.pretrained: ImageNet weights fit the standard width only "
                                          r"\(model.width=1.0\); got width=0.5"):
        load_config(None, ["model.width=0.5", "model.pretrained=IMAGENET1K_V1"])


def test_resdcn_up_convs_start_as_the_official_fill_up_weights_leaves_them():
    """resnet_dcn.py's fill_up_weights on a full (not grouped) deconv: w[c, 0] = bilinear for every
    input c, the rest PyTorch's draw. On all-ones input of C channels, output channel 0 is then the
    sum of C bilinear up-samplings of ones: C away from the border (hand value), the others not."""
    from centernet_ray.model.resnet import UpConvNeck

    torch.manual_seed(0)
    neck = UpConvNeck((8, 16, 24, 32), (16, 12, 8), deformable=True)
    deconv = neck.stages[0][3]  # DCN, BN, ReLU, then the up-conv [32 -> 16]
    assert isinstance(deconv, torch.nn.ConvTranspose2d) and deconv.weight.shape == (16, 16, 4, 4)
    # f = ceil(4 / 2) = 2, c = 3 / 4: the profile 1 - |i / 2 - 3 / 4| = 0.25, 0.75, 0.75, 0.25
    profile = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.equal(deconv.weight[:, 0], (profile[:, None] * profile[None, :]).expand(16, 4, 4))
    assert deconv.weight[:, 1:].abs().sum() > 0  # PyTorch's draw, not zeros
    with torch.no_grad():
        out = deconv(torch.ones(1, 16, 6, 6))  # [1, 16, 12, 12]
    assert torch.allclose(out[0, 0, 1:-1, 1:-1], torch.full((10, 10), 16.0))
    assert not torch.allclose(out[0, 1, 1:-1, 1:-1], torch.full((10, 10), 1.0), atol=0.1)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) and m.weight[:, 0].eq(profile[0] ** 2).all()
                   for m in UpConvNeck((8, 16, 24, 32), (16, 12, 8)).modules())  # the plain neck: PyTorch's draw


def test_lateral_neck_uses_every_backbone_stage():
    from centernet_ray.model.resnet import UpConvNeck

    torch.manual_seed(0)
    channels = (8, 16, 24, 32)
    stages = [torch.randn(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(channels)]
    for lateral in (False, True):
        neck = UpConvNeck(channels, (16, 12, 8), lateral=lateral).eval()
        out = neck(stages)
        assert out.shape == (1, 8, 32, 32)
        changed = neck([stages[0] + 1.0, *stages[1:]])  # perturb only the stride-4 stage
        assert (not torch.equal(out, changed)) == lateral
    model = build_model(ModelConfig(width=0.25, neck_channels=(32, 16, 16), head_conv=8, lateral=True), 2)
    outputs = model(torch.randn(1, 3, 96, 64))
    assert outputs["heatmap"].shape == (1, 2, 24, 16) and outputs["size"].shape == (1, 2, 24, 16)
