"""CenterNet detector: backbone + neck to stride 4, then heatmap / size / offset heads.

``build_model(config.model, num_classes)`` returns a ready :class:`CenterNet`. Its forward maps
[B, 3, H, W] normalised images to ``{"heatmap": [B, C, H/4, W/4] logits, "size": [B, 2, H/4, W/4],
"offset": [B, 2, H/4, W/4]}``.
"""

from __future__ import annotations

import torch
from torch import nn

from centernet_ray.config import ModelConfig
from centernet_ray.model.dla import DLA34, DLAUpNeck
from centernet_ray.model.heads import HEATMAP_PRIOR_BIAS, _head
from centernet_ray.model.hourglass import HourglassCenterNet
from centernet_ray.model.pretrained import load_dla34_imagenet, load_resnet_imagenet
from centernet_ray.model.resnet import UpConvNeck, resnet_arch, resnet_channels, resnet_trunk
from centernet_ray.targets import OUTPUT_STRIDE

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "OUTPUT_STRIDE", "CenterNet", "build_model", "build_trunk"]

# ImageNet statistics used by torchvision's pretrained backbones; images are normalised with them.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class CenterNet(nn.Module):
    """Backbone + neck + three heads. ``backbone`` maps [B,3,H,W] to its stages' features (a list of
    increasing strides up to 32) and ``neck`` fuses them at stride 4 with ``neck.out_channels`` channels."""

    def __init__(self, backbone: nn.Module, neck: nn.Module, num_classes: int, head_conv: int = 64) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        channels = neck.out_channels
        self.num_classes = num_classes
        self.heatmap = _head(channels, head_conv, num_classes, bias=HEATMAP_PRIOR_BIAS)
        self.size = _head(channels, head_conv, 2)
        self.offset = _head(channels, head_conv, 2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.neck(self.backbone(images))  # [B, F, H/4, W/4]
        return {"heatmap": self.heatmap(features), "size": self.size(features), "offset": self.offset(features)}


def build_model(config: ModelConfig, num_classes: int) -> nn.Module:
    """A CenterNet for ``num_classes`` classes as ``config`` describes (ResNet/ResDCN, DLA-34 or
    Hourglass-104), with pretrained backbone weights loaded when ``config.pretrained`` names them.

    Every model maps [B, 3, H, W] to the dict of the three heads at stride 4; Hourglass-104 in
    training mode adds the first stack's heads under ``aux`` (intermediate supervision, averaged by the loss)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    if config.backbone == "hourglass104":
        return HourglassCenterNet(num_classes, config.head_conv)
    trunk = build_trunk(config)
    if config.backbone == "dla34":
        neck = DLAUpNeck(trunk.channels, deformable=config.deformable)
    else:
        neck = UpConvNeck(resnet_channels(resnet_arch(config.backbone), config.width), tuple(config.neck_channels),
                          config.deformable, config.lateral)
    return CenterNet(trunk, neck, num_classes, config.head_conv)


def build_trunk(config: ModelConfig) -> nn.Module:
    """The backbone trunk of a ResNet/ResDCN or DLA-34 CenterNet, with ``config.pretrained``'s weights
    loaded: a ``UserInputError`` says what does not fit when they do not."""
    if config.backbone == "dla34":
        trunk = DLA34()
        if config.pretrained:
            load_dla34_imagenet(trunk, config.pretrained)
        return trunk
    arch = resnet_arch(config.backbone)
    trunk = resnet_trunk(arch, config.width)
    if config.pretrained:  # at model.width 1.0 (ModelConfig refuses weights for another width)
        load_resnet_imagenet(trunk, arch, config.pretrained)
    return trunk
