"""CenterNet detector: backbone + neck to stride 4, then heatmap / size / offset heads.

``build_model(config.model, num_classes)`` returns a ready :class:`CenterNet`. Its forward maps
[B, 3, H, W] normalised images to ``{"heatmap": [B, C, H/4, W/4] logits, "size": [B, 2, H/4, W/4],
"offset": [B, 2, H/4, W/4]}``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from centernet_ray.config import ModelConfig
from centernet_ray.model.resnet import UpConvNeck, resnet_channels, resnet_trunk

log = logging.getLogger(__name__)

OUTPUT_STRIDE = 4
HEATMAP_PRIOR_BIAS = -2.19  # sigmoid(-2.19) ~= 0.1: every pixel starts as a weak "maybe"

# ImageNet statistics used by torchvision's pretrained backbones; images are normalised with them.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def _head(in_channels: int, head_conv: int, out_channels: int, bias: float = 0.0) -> nn.Sequential:
    head = nn.Sequential(
        nn.Conv2d(in_channels, head_conv, 3, padding=1, bias=True),
        nn.ReLU(inplace=True),
        nn.Conv2d(head_conv, out_channels, 1, bias=True),
    )
    # PyTorch's default (Kaiming-uniform) weights. The official code draws regression-head weights
    # from N(0, 0.001); with two such layers in a row each layer's gradient is scaled by the other's
    # tiny weights, and from scratch a batch of 32 could not be overfitted in 150 steps (heatmap loss
    # 3.1 -> 1.8, where default weights reach 0.001).
    nn.init.constant_(head[2].bias, bias)
    return head


class CenterNet(nn.Module):
    """Backbone + neck + three heads. ``backbone`` maps [B,3,H,W] to its stages' features (a list,
    strides 4 to 32) and ``neck`` fuses them at stride 4 with ``neck.out_channels`` channels."""

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


def build_model(config: ModelConfig, num_classes: int) -> CenterNet:
    """A CenterNet for ``num_classes`` classes as ``config`` describes, with pretrained backbone
    weights loaded when ``config.pretrained`` names them."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    backbone = resnet_trunk(config.backbone, config.width)
    neck = UpConvNeck(resnet_channels(config.backbone, config.width), tuple(config.neck_channels), config.deformable,
                      config.lateral)
    if config.pretrained:
        if config.width != 1.0:
            raise ValueError(f"model.pretrained needs the standard width (model.width=1.0); got {config.width}")
        load_pretrained_backbone(backbone, config.backbone, config.pretrained)
    return CenterNet(backbone, neck, num_classes, config.head_conv)


def load_pretrained_backbone(backbone: nn.Sequential, arch: str, source: str) -> None:
    """Load ImageNet weights into a ``resnet_trunk``: a local file (a torchvision-style state dict,
    read with ``weights_only=True``) or a torchvision weights name such as ``IMAGENET1K_V1``."""
    if Path(source).exists():
        state = torch.load(source, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    else:
        try:
            weights = torchvision.models.get_model_weights(arch)[source] if source != "DEFAULT" \
                else torchvision.models.get_model_weights(arch).DEFAULT
        except KeyError as exc:
            names = ", ".join(w.name for w in torchvision.models.get_model_weights(arch))
            raise ValueError(f"model.pretrained={source!r} is neither an existing file nor a torchvision "
                             f"weights name for {arch} ({names}, DEFAULT)") from exc
        state = weights.get_state_dict(progress=False)
    # resnet_trunk is nn.Sequential over (conv1, bn1, relu, maxpool, layer1..4): rename the keys.
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in names:
            renamed[f"{names.index(head)}.{rest}"] = value
    result = backbone.load_state_dict(renamed, strict=False)
    if result.missing_keys:
        raise ValueError(f"pretrained weights {source!r} do not fit {arch}: missing {result.missing_keys[:5]}")
    log.info("loaded pretrained %s backbone weights from %s", arch, source)
