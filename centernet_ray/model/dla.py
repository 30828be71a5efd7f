"""DLA-34 trunk (Deep Layer Aggregation) + DLA-Up / IDA-Up neck: the official CenterNet "dla_34" model.

``DLA34`` maps [B, 3, H, W] to its six levels' outputs (strides 1 to 32); ``DLAUpNeck`` fuses levels
2..5 back to one [B, 64, H/4, W/4] map. Module names follow the DLA authors' code, so their ImageNet
weights (``dla34-ba72cf86.pth``) load by key (``pretrained.load_dla34_imagenet``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from centernet_ray.errors import UserInputError
from centernet_ray.model.blocks import BasicBlock, bilinear_kernel
from centernet_ray.model.deform import ModulatedDeformConv

DLA34_CHANNELS = (16, 32, 64, 128, 256, 512)
INPUT_MULTIPLE = 32  # five stride-2 steps; any other side would leave levels that no longer align


class Root(nn.Module):
    """Aggregation node: concatenate children on channels, 1x1 conv + BN + ReLU -> [B, out, H, W].
    (DLA-34's roots have no residual; the deeper DLAs' do.)"""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, children: list[torch.Tensor]) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(torch.cat(children, dim=1))))


class Tree(nn.Module):
    """Hierarchical deep aggregation of ``depth`` levels: [B, in, H, W] -> [B, out, H/stride, W/stride].

    Depth 1 is two blocks joined by a ``Root``; depth d is two depth-(d-1) trees whose last root
    also takes the first tree's output (and, with ``level_root``, the down-sampled input).
    ``root_channels`` is the width of the concatenation the innermost root sees.
    """

    def __init__(self, depth: int, in_channels: int, out_channels: int, stride: int = 1,
                 level_root: bool = False, root_channels: int = 0) -> None:
        super().__init__()
        root_channels = root_channels or 2 * out_channels
        if level_root:
            root_channels += in_channels
        if depth == 1:
            self.tree1: nn.Module = BasicBlock(in_channels, out_channels, stride)
            self.tree2: nn.Module = BasicBlock(out_channels, out_channels)
            self.root = Root(root_channels, out_channels)
        else:
            self.tree1 = Tree(depth - 1, in_channels, out_channels, stride)
            self.tree2 = Tree(depth - 1, out_channels, out_channels, root_channels=root_channels + out_channels)
        self.depth = depth
        self.level_root = level_root
        self.downsample = nn.MaxPool2d(stride, stride=stride) if stride > 1 else None
        self.project = None
        if in_channels != out_channels:
            self.project = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                         nn.BatchNorm2d(out_channels))
            if depth > 1:
                # The official code computes this projection and then drops it (the inner tree makes
                # its own). Kept so that the ImageNet weights load by key, but neither run nor
                # trained: a parameter without a gradient would stop DDP.
                self.project.requires_grad_(False)

    def forward(self, x: torch.Tensor, children: list[torch.Tensor] | None = None) -> torch.Tensor:
        children = [] if children is None else children
        bottom = self.downsample(x) if self.downsample is not None else x
        if self.level_root:
            children.append(bottom)
        if self.depth == 1:
            residual = self.project(bottom) if self.project is not None else bottom
            x1 = self.tree1(x, residual)
            x2 = self.tree2(x1)
            return self.root([x2, x1, *children])
        x1 = self.tree1(x)
        children.append(x1)
        return self.tree2(x1, children)


def _conv_level(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DLA34(nn.Module):
    """DLA-34 without its classifier: [B, 3, H, W] -> six levels [B, channels[i], H/2^i, W/2^i], i = 0..5.

    H and W must be multiples of 32. Levels 0-1 are single 3x3 convs, levels 2-5 ``Tree``s of
    depths 1, 2, 2, 1. 15.27M parameters (15.78M with the ImageNet classifier, which is left out).
    """

    channels = DLA34_CHANNELS

    def __init__(self) -> None:
        super().__init__()
        c = self.channels
        self.base_layer = nn.Sequential(nn.Conv2d(3, c[0], 7, padding=3, bias=False), nn.BatchNorm2d(c[0]),
                                        nn.ReLU(inplace=True))
        self.level0 = _conv_level(c[0], c[0], stride=1)
        self.level1 = _conv_level(c[0], c[1], stride=2)
        self.level2 = Tree(1, c[1], c[2], stride=2)
        self.level3 = Tree(2, c[2], c[3], stride=2, level_root=True)
        self.level4 = Tree(2, c[3], c[4], stride=2, level_root=True)
        self.level5 = Tree(1, c[4], c[5], stride=2, level_root=True)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # as the DLA authors' ImageNet training
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-2] % INPUT_MULTIPLE or x.shape[-1] % INPUT_MULTIPLE:
            raise UserInputError(f"DLA-34 needs image sides that are multiples of {INPUT_MULTIPLE}; "
                                 f"got {tuple(x.shape[-2:])}")
        x = self.base_layer(x)
        levels = []
        for level in (self.level0, self.level1, self.level2, self.level3, self.level4, self.level5):
            x = level(x)
            levels.append(x)
        return levels


def _conv_bn_relu(in_channels: int, out_channels: int, deformable: bool) -> nn.Sequential:
    conv = ModulatedDeformConv(in_channels, out_channels) if deformable \
        else nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _bilinear_upsampler(channels: int, factor: int) -> nn.ConvTranspose2d:
    """Per-channel (grouped) transposed conv initialised as exact x``factor`` bilinear up-sampling:
    [B, C, h, w] -> [B, C, factor*h, factor*w]."""
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2,
                            groups=channels, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(factor).expand_as(up.weight))  # [C, 1, k, k]
    return up


class IDAUp(nn.Module):
    """Iterative deep aggregation towards the finest map.

    ``maps[0]`` is [B, out, h, w]; ``maps[i]`` is [B, in_channels[i], h/up_factors[i], w/up_factors[i]].
    Each ``maps[i]`` (i >= 1) is projected to ``out`` channels, up-sampled to h x w, added to the
    previous aggregate and refined by a 3x3 "node" conv. Returns ``[maps[0], aggregate_1, ...]``, all
    [B, out, h, w].
    """

    def __init__(self, out_channels: int, in_channels: Sequence[int], up_factors: Sequence[int],
                 deformable: bool = True) -> None:
        super().__init__()
        self.proj = nn.ModuleList(_conv_bn_relu(c, out_channels, deformable) for c in in_channels[1:])
        self.up = nn.ModuleList(_bilinear_upsampler(out_channels, f) for f in up_factors[1:])
        self.node = nn.ModuleList(_conv_bn_relu(out_channels, out_channels, deformable) for _ in in_channels[1:])

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = [maps[0]]
        for x, proj, up, node in zip(maps[1:], self.proj, self.up, self.node):
            out.append(node(up(proj(x)) + out[-1]))
        return out


class DLAUp(nn.Module):
    """DLA-Up: for levels ``channels`` (each at twice the previous stride), coarse to fine, an IDA-Up
    pulls every coarser map down to the next finer level. Returns one map per level,
    [B, channels[i], h_i, w_i], each aggregating that level and all coarser ones."""

    def __init__(self, channels: Sequence[int], deformable: bool = True) -> None:
        super().__init__()
        widths = list(channels)  # channels of the current maps, updated as levels are aggregated
        self.ida = nn.ModuleList()
        for target in range(len(channels) - 2, -1, -1):
            coarser = len(channels) - 1 - target
            # after the previous step every coarser map sits one stride above the target
            self.ida.append(IDAUp(channels[target], widths[target:], [1] + [2] * coarser, deformable))
            widths[target + 1:] = [channels[target]] * coarser

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        maps = list(levels)
        outputs = [maps[-1]]
        for step, ida in enumerate(self.ida):
            target = len(maps) - 2 - step
            maps[target:] = ida(maps[target:])
            outputs.insert(0, maps[-1])
        return outputs


class DLAUpNeck(nn.Module):
    """CenterNet's DLA neck (DLASeg without heads): DLA-Up over levels ``first_level``..5, then an
    IDA-Up over its outputs at levels ``first_level``..4.

    ``forward(levels)`` takes ``DLA34``'s six levels and returns [B, channels[first_level], H/4, W/4]
    (first_level=2). The proj/node convs are modulated deformable 3x3 convs + BN + ReLU, or plain
    3x3 convs + BN + ReLU when ``deformable=False``.
    """

    def __init__(self, channels: tuple[int, ...] = DLA34_CHANNELS, first_level: int = 2,
                 deformable: bool = True) -> None:
        super().__init__()
        last_level = len(channels) - 1
        if not 0 <= first_level < last_level:
            raise ValueError(f"first_level must lie in [0, {last_level}); got {first_level}")
        self.first_level = first_level
        self.dla_up = DLAUp(channels[first_level:], deformable)
        # the stride-32 level enters only through DLA-Up, as in the official model (last_level=5)
        self.ida_up = IDAUp(channels[first_level], channels[first_level:last_level],
                            [2 ** i for i in range(last_level - first_level)], deformable)
        self.out_channels = channels[first_level]

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        maps = self.dla_up(levels[self.first_level:])  # strides 2^first_level .. 32
        return self.ida_up(maps[:-1])[-1]  # [B, out_channels, H / 2^first_level, W / 2^first_level]
