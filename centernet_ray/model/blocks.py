"""Pieces the backbones and necks share: the residual block of DLA-34 and Hourglass-104, and the
bilinear kernel the up-sampling transposed convs start from."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convs + BN with a residual: [B, in, H, W] -> [B, out, H/stride, W/stride]. The residual
    is ``x`` unless the caller passes one (DLA's ``Tree`` when the block changes shape, Hourglass's
    ``Residual`` its shortcut). Parameter names are the DLA authors' (conv1, bn1, conv2, bn2), so
    their ImageNet weights load into it."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        residual = x if residual is None else residual
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + residual)


def bilinear_kernel(factor: int) -> torch.Tensor:
    """The [2 * factor, 2 * factor] kernel with which a stride-``factor`` transposed conv (padding
    ``factor // 2``) up-samples bilinearly, as the official ``fill_up_weights`` computes it."""
    center = (2 * factor - 1 - factor % 2) / (2.0 * factor)
    profile = 1 - torch.abs(torch.arange(2 * factor, dtype=torch.float32) / factor - center)
    return profile[:, None] * profile[None, :]
