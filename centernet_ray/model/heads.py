"""The three CenterNet heads' building block, shared by every model family, and the output contract.

Every model's forward returns one dict of heads: ``heatmap`` [B, C, H/4, W/4] logits, ``size`` and
``offset`` [B, 2, H/4, W/4]. A model with intermediate supervision (Hourglass-104) adds, in training
mode only, ``AUX_OUTPUTS``: a list of the earlier stacks' dicts of the same three heads.
"""

from __future__ import annotations

from torch import nn

AUX_OUTPUTS = "aux"  # earlier stacks' heads (training mode only): list[dict[str, Tensor]]

HEATMAP_PRIOR_BIAS = -2.19  # sigmoid(-2.19) ~= 0.1: every pixel starts as a weak "maybe"


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
