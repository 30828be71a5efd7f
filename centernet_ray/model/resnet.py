"""ResNet backbone (torchvision) + 3-stage up-convolution neck: stride 32 features -> stride 4."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from centernet_ray.model.blocks import bilinear_kernel
from centernet_ray.model.deform import ModulatedDeformConv

RESNET_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def resnet_arch(backbone: str) -> str:
    """torchvision's ResNet under a ``model.backbone``: ResDCN is the ResNet with the deformable neck."""
    return backbone.replace("resdcn", "resnet")


def resnet_channels(name: str, width: float = 1.0) -> tuple[int, int, int, int]:
    """Channels of the stride 4, 8, 16 and 32 features of ``resnet_trunk(name, width)``."""
    if name not in RESNET_CHANNELS:
        raise ValueError(f"unknown ResNet {name!r}; choose from {', '.join(RESNET_CHANNELS)}")
    expansion = RESNET_CHANNELS[name] // 512  # 4 for bottleneck ResNets
    return tuple((base if width == 1.0 else _scaled(base, width)) * expansion for base in (64, 128, 256, 512))


def _scaled(channels: int, width: float) -> int:
    return max(8, int(round(channels * width / 8)) * 8)  # multiples of 8 keep the kernels fast


class ResNetTrunk(nn.Sequential):
    """(conv1, bn1, relu, maxpool, layer1..layer4) of a torchvision ResNet; the forward returns
    every stage's output: [B, C2, H/4, W/4], [B, C3, H/8, W/8], [B, C4, H/16, W/16], [B, C5, H/32, W/32]."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        stages = []
        for index, layer in enumerate(self):
            x = layer(x)
            if index >= 4:
                stages.append(x)
        return stages


def resnet_trunk(name: str, width: float = 1.0) -> ResNetTrunk:
    """torchvision ResNet without its pooling and classifier, returning the four stages' features.

    ``width`` scales every stage's channels (0.5 = half-width: ~4x fewer FLOPs); the layers are
    built by torchvision's own ``_make_layer`` with the scaled widths.
    """
    if name not in RESNET_CHANNELS:
        raise ValueError(f"unknown ResNet {name!r}; choose from {', '.join(RESNET_CHANNELS)}")
    net = getattr(torchvision.models, name)(weights=None)
    if width != 1.0:
        block = type(net.layer1[0])
        depths = [len(net.layer1), len(net.layer2), len(net.layer3), len(net.layer4)]
        stem = _scaled(64, width)
        net.inplanes = stem
        net.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        net.bn1 = nn.BatchNorm2d(stem)
        net.layer1 = net._make_layer(block, stem, depths[0])
        net.layer2 = net._make_layer(block, _scaled(128, width), depths[1], stride=2)
        net.layer3 = net._make_layer(block, _scaled(256, width), depths[2], stride=2)
        net.layer4 = net._make_layer(block, _scaled(512, width), depths[3], stride=2)
    return ResNetTrunk(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


def _official_resdcn_up_init(deconv: nn.ConvTranspose2d) -> None:
    """Start a ResDCN neck's up-conv as the official code does (``fill_up_weights`` in
    ``resnet_dcn.py``): PyTorch's default draw, then the bilinear kernel in every [input c, output 0]
    slice. The function was written for DLA's per-channel (grouped) deconvs, where it makes each
    channel a bilinear up-sampler (``model/dla.py``); on this full deconv it makes output channel 0
    the sum of every input channel up-sampled and leaves the other outputs random. Kept as it runs
    there, because the published ResDCN numbers come from that start.

    ``deconv.weight`` is [in, out, 4, 4] (stride 2).
    """
    with torch.no_grad():
        deconv.weight[:, 0] = bilinear_kernel(2)


class UpConvNeck(nn.Module):
    """Three x2 up-sampling stages: stride-32 features -> [B, channels[-1], H/4, W/4].

    Each stage: (optional modulated deformable 3x3 conv + BN + ReLU) then a 4x4 stride-2
    transposed conv + BN + ReLU ("ResDCN" when ``deformable``, "MSRA ResNet" otherwise).
    With ``lateral``, each stage's output is added to a 1x1 conv + BN projection of the backbone
    stage of the same stride before its ReLU (an FPN/U-Net style top-down path). The official
    ResNet models have no such path; trained from scratch on small inputs it learns several times
    faster per step, because small objects' positions need not survive a 4x4 stride-32 map.
    """

    def __init__(self, stage_channels: tuple[int, ...], channels: tuple[int, ...] = (256, 128, 64),
                 deformable: bool = False, lateral: bool = False) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        self.laterals = nn.ModuleList() if lateral else None
        previous = stage_channels[-1]
        for out, skip in zip(channels, reversed(stage_channels[:-1])):
            layers: list[nn.Module] = []
            if deformable:
                layers += [ModulatedDeformConv(previous, out), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                previous = out
            deconv = nn.ConvTranspose2d(previous, out, kernel_size=4, stride=2, padding=1, bias=False)
            if deformable:
                _official_resdcn_up_init(deconv)
            layers += [deconv, nn.BatchNorm2d(out)]
            self.stages.append(nn.Sequential(*layers))
            if self.laterals is not None:
                self.laterals.append(nn.Sequential(nn.Conv2d(skip, out, 1, bias=False), nn.BatchNorm2d(out)))
            previous = out
        self.out_channels = previous

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """``stages``: the backbone's stride 4, 8, 16, 32 features; returns [B, out_channels, H/4, W/4]."""
        x = stages[-1]
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if self.laterals is not None:
                x = x + self.laterals[index](stages[-2 - index])
            x = torch.relu(x)
        return x
