"""Hourglass-104 CenterNet: the two-stack "large hourglass" of CornerNet with CenterNet's heads.

A stem takes [B, 3, H, W] images to stride 4 with 256 channels; each stack is a recursive
hourglass (5 stride-2 levels down, nearest 2x upsampling + addition back up) followed by a
3x3 "cnv" layer, and has its own heatmap / size / offset heads. Between stacks the stack's
input and its cnv output are merged (intermediate connection) to feed the next stack.

Training uses every stack's outputs (intermediate supervision: the last stack's heads, with the
earlier stacks' under ``aux``, averaged over the stacks by ``CenterNetLoss``); inference uses only
the last stack's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from centernet_ray.errors import UserInputError
from centernet_ray.model.blocks import BasicBlock
from centernet_ray.model.heads import AUX_OUTPUTS, HEATMAP_PRIOR_BIAS, _head

STEM_CHANNELS = 128
STACK_CHANNELS = 256
HOURGLASS_DIMS = (256, 256, 384, 384, 384, 512)  # level 0 (stride 4) .. level 5 (stride 128)
HOURGLASS_BLOCKS = (2, 2, 2, 2, 2, 4)
INPUT_MULTIPLE = 4 * 2 ** (len(HOURGLASS_DIMS) - 1)  # 128: every level must halve evenly


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _conv1x1_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class Residual(BasicBlock):
    """:class:`BasicBlock` with its own shortcut (1x1 conv-BN when the shape changes):
    [B, in, H, W] -> [B, out, H/stride, W/stride]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.shortcut = (_conv1x1_bn(in_channels, out_channels, stride)
                         if stride != 1 or in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, self.shortcut(x))


def _residuals(in_channels: int, out_channels: int, count: int, stride: int = 1) -> nn.Sequential:
    """``count`` residual blocks; the first changes channels and stride."""
    blocks = [Residual(in_channels, out_channels, stride)]
    blocks += [Residual(out_channels, out_channels) for _ in range(count - 1)]
    return nn.Sequential(*blocks)


class Hourglass(nn.Module):
    """One recursive hourglass level: [B, dims[0], H, W] -> [B, dims[0], H, W].

    The skip branch keeps the resolution; the low branch halves it with a stride-2 residual
    block (no max-pool), recurses (or, at the bottom, runs ``blocks[-1]`` residual blocks at
    ``dims[-1]``), comes back to ``dims[0]`` channels and is upsampled (nearest, 2x) and added.
    """

    def __init__(self, dims: tuple[int, ...], blocks: tuple[int, ...]) -> None:
        super().__init__()
        channels, inner = dims[0], dims[1]
        self.skip = _residuals(channels, channels, blocks[0])
        self.down = _residuals(channels, inner, blocks[0], stride=2)
        self.inner = Hourglass(dims[1:], blocks[1:]) if len(dims) > 2 else _residuals(inner, inner, blocks[1])
        # Mirror of `down`: blocks at the inner width, the last one back to `channels`.
        self.up = nn.Sequential(*[Residual(inner, inner) for _ in range(blocks[0] - 1)], Residual(inner, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.up(self.inner(self.down(x)))  # [B, C, H/2, W/2]
        return self.skip(x) + F.interpolate(low, scale_factor=2.0, mode="nearest")


class HourglassCenterNet(nn.Module):
    """CenterNet on a ``num_stacks``-stack Hourglass-104 (CornerNet's "large hourglass").

    forward: [B, 3, H, W] with H and W multiples of 128 -> the last stack's ``{"heatmap":
    [B, num_classes, H/4, W/4] logits, "size": [B, 2, H/4, W/4], "offset": [B, 2, H/4, W/4]}``;
    in training mode also ``"aux"``: the earlier stacks' dicts, first stack first.
    """

    def __init__(self, num_classes: int, head_conv: int = 256, num_stacks: int = 2) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        if num_stacks < 1:
            raise ValueError(f"num_stacks must be >= 1; got {num_stacks}")
        self.num_classes = num_classes
        self.num_stacks = num_stacks
        width = HOURGLASS_DIMS[0]
        self.stem = nn.Sequential(
            _conv_bn_relu(3, STEM_CHANNELS, 7, stride=2),  # [B, 128, H/2, W/2]
            Residual(STEM_CHANNELS, width, stride=2),  # [B, 256, H/4, W/4]
        )
        self.hourglasses = nn.ModuleList(Hourglass(HOURGLASS_DIMS, HOURGLASS_BLOCKS) for _ in range(num_stacks))
        self.features = nn.ModuleList(_conv_bn_relu(width, STACK_CHANNELS, 3) for _ in range(num_stacks))
        self.heads = nn.ModuleList(
            nn.ModuleDict({
                "heatmap": _head(STACK_CHANNELS, head_conv, num_classes, bias=HEATMAP_PRIOR_BIAS),
                "size": _head(STACK_CHANNELS, head_conv, 2),
                "offset": _head(STACK_CHANNELS, head_conv, 2),
            })
            for _ in range(num_stacks))
        # Intermediate connections: stack i's input and features, merged into stack i+1's input.
        self.merge_inputs = nn.ModuleList(_conv1x1_bn(width, width) for _ in range(num_stacks - 1))
        self.merge_features = nn.ModuleList(_conv1x1_bn(STACK_CHANNELS, width) for _ in range(num_stacks - 1))
        self.merge_blocks = nn.ModuleList(Residual(width, width) for _ in range(num_stacks - 1))

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        height, width = images.shape[-2:]
        if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE:
            raise UserInputError(f"Hourglass input height and width must be multiples of {INPUT_MULTIPLE}; "
                                 f"got {height}x{width} (resize or pad, e.g. to 512x512)")
        x = self.stem(images)  # [B, 256, H/4, W/4]
        outputs = []
        for i in range(self.num_stacks):
            features = self.features[i](self.hourglasses[i](x))  # [B, 256, H/4, W/4]
            # Only the last stack's heads matter at inference; skip the others' compute.
            if self.training or i == self.num_stacks - 1:
                outputs.append({name: head(features) for name, head in self.heads[i].items()})
            if i < self.num_stacks - 1:
                x = F.relu(self.merge_inputs[i](x) + self.merge_features[i](features), inplace=True)
                x = self.merge_blocks[i](x)
        if self.training:
            return {**outputs[-1], AUX_OUTPUTS: outputs[:-1]}
        return outputs[-1]
