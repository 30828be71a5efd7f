"""CenterNet detector: backbone + neck to stride 4, then heatmap / size / offset heads.

``build_model(config.model, num_classes)`` returns a ready :class:`CenterNet`. Its forward maps
[B, 3, H, W] normalised images to ``{"heatmap": [B, C, H/4, W/4] logits, "size": [B, 2, H/4, W/4],
"offset": [B, 2, H/4, W/4]}``.
"""

from __future__ import annotations

import logging

import torch
import torchvision
from torch import nn

from centernet_ray import storage
from centernet_ray.config import ModelConfig
from centernet_ray.errors import UserInputError
from centernet_ray.model.dla import DLA34, DLAUpNeck, load_dla34_imagenet
from centernet_ray.model.heads import HEATMAP_PRIOR_BIAS, _head
from centernet_ray.model.hourglass import HourglassCenterNet
from centernet_ray.model.resnet import UpConvNeck, resnet_channels, resnet_trunk
from centernet_ray.targets import OUTPUT_STRIDE

log = logging.getLogger(__name__)

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "OUTPUT_STRIDE", "CenterNet", "build_model"]

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
    if config.backbone == "dla34":
        trunk = DLA34()
        if config.pretrained:
            load_dla34_imagenet(trunk, config.pretrained)
        return CenterNet(trunk, DLAUpNeck(trunk.channels, deformable=config.deformable), num_classes, config.head_conv)
    arch = config.backbone.replace("resdcn", "resnet")  # ResDCN = the ResNet with the deformable neck
    backbone = resnet_trunk(arch, config.width)
    neck = UpConvNeck(resnet_channels(arch, config.width), tuple(config.neck_channels), config.deformable,
                      config.lateral)
    if config.pretrained:
        if config.width != 1.0:
            raise UserInputError(f"model.pretrained needs the standard width (model.width=1.0); got {config.width}")
        load_pretrained_backbone(backbone, arch, config.pretrained)
    return CenterNet(backbone, neck, num_classes, config.head_conv)


def load_pretrained_backbone(backbone: nn.Sequential, arch: str, source: str) -> None:
    """Load ImageNet weights into a ``resnet_trunk``: a file, local or a URI (a torchvision-style
    state dict, read with ``weights_only=True``), or a torchvision weights name such as ``IMAGENET1K_V1``."""
    if storage.is_file(source):
        with storage.open_random_access(source) as handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    else:
        try:
            weights = torchvision.models.get_model_weights(arch)[source] if source != "DEFAULT" \
                else torchvision.models.get_model_weights(arch).DEFAULT
        except KeyError as exc:
            names = ", ".join(w.name for w in torchvision.models.get_model_weights(arch))
            raise UserInputError(f"model.pretrained={source!r} is neither an existing file nor a torchvision "
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
        raise UserInputError(f"pretrained weights {source!r} do not fit {arch}: missing {result.missing_keys[:5]}")
    log.info("loaded pretrained %s backbone weights from %s", arch, source)
