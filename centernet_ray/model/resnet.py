"""ResNet backbone (torchvision) + 3-stage up-convolution neck: stride 32 features -> stride 4."""

from __future__ import annotations

import math

import torch
import torchvision
from torch import nn

from centernet_ray.model.deform import ModulatedDeformConv

RESNET_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def resnet_channels(name: str, width: float = 1.0) -> int:
    """Channels of the stride-32 features of ``resnet_trunk(name, width)``."""
    return RESNET_CHANNELS[name] if width == 1.0 else _scaled(512, width) * (RESNET_CHANNELS[name] // 512)


def _scaled(channels: int, width: float) -> int:
    return max(8, int(round(channels * width / 8)) * 8)  # multiples of 8 keep the kernels fast


def resnet_trunk(name: str, width: float = 1.0) -> nn.Sequential:
    """torchvision ResNet without its pooling and classifier: [B, 3, H, W] -> [B, C5, H/32, W/32].

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
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


def _bilinear_init(deconv: nn.ConvTranspose2d) -> None:
    """Initialise a stride-2 transposed conv as bilinear up-sampling (as the official code does)."""
    weight = deconv.weight.data  # [in, out, k, k]
    k = weight.shape[-1]
    factor = math.ceil(k / 2)
    center = (2 * factor - 1 - factor % 2) / (2.0 * factor)
    coords = torch.arange(k, dtype=torch.float32)
    profile = 1 - torch.abs(coords / factor - center)
    kernel = profile[:, None] * profile[None, :]
    weight.zero_()
    for c in range(min(weight.shape[0], weight.shape[1])):
        weight[c, c] = kernel


class UpConvNeck(nn.Module):
    """Three x2 up-sampling stages: [B, in, H/32, W/32] -> [B, channels[-1], H/4, W/4].

    Each stage: (optional modulated deformable 3x3 conv + BN + ReLU) then a 4x4 stride-2
    transposed conv + BN + ReLU ("ResDCN" when ``deformable``, "MSRA ResNet" otherwise).
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...] = (256, 128, 64), deformable: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for out in channels:
            if deformable:
                layers += [ModulatedDeformConv(previous, out), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                previous = out
            deconv = nn.ConvTranspose2d(previous, out, kernel_size=4, stride=2, padding=1, bias=False)
            if deformable:
                _bilinear_init(deconv)
            layers += [deconv, nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            previous = out
        self.layers = nn.Sequential(*layers)
        self.out_channels = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
