"""Modulated deformable 3x3 convolution (DCNv2) on ``torchvision.ops.DeformConv2d``: nothing to compile."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import DeformConv2d


class ModulatedDeformConv(nn.Module):
    """[B, in, H, W] -> [B, out, H, W]. Offsets and modulation masks come from a zero-initialised
    3x3 conv, so at initialisation it is a plain 3x3 convolution with every tap weighted 0.5."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        taps = kernel_size * kernel_size
        self.offset_mask = nn.Conv2d(in_channels, 3 * taps, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        self.conv = DeformConv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.taps = taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset_mask = self.offset_mask(x)
        offset = offset_mask[:, : 2 * self.taps]  # [B, 2*k*k, H, W] (dy, dx) per tap
        mask = torch.sigmoid(offset_mask[:, 2 * self.taps:])  # [B, k*k, H, W]
        # deform_conv2d has no reduced-precision kernel: run it in the weights' dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = self.conv.weight.dtype
            return self.conv(x.to(dtype), offset.to(dtype), mask.to(dtype))
