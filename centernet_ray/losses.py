"""CenterNet losses: penalty-reduced focal loss on heatmaps, masked L1 on size and offset.

The focal loss works on logits: log p = logsigmoid(x) and log(1 - p) = logsigmoid(x) - x, so it is
finite for every finite logit with no clamping, in fp32 and under bf16/fp16 autocast (it always
computes in fp32). Forward and gradient are computed in one fused pass (the gradient is written
out analytically below), which is exact and several times faster than autograd over the usual
clamped-sigmoid formulation (3.65x on the CPU; BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from centernet_ray.config import LossConfig
from centernet_ray.model.heads import AUX_OUTPUTS

# Elements per fused chunk on CPU: small enough that a chunk's temporaries stay in cache.
# Accelerators take the whole tensor at once (launch count matters there, not cache).
_CPU_CHUNK = 1 << 16


def _focal_terms(x: torch.Tensor, y: torch.Tensor, alpha: float, beta: float,
                 need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-element focal term f (to be summed, negated and divided by N) and df/dx.

    With s = sigmoid(x), positives (y == 1): f = (1-s)^a log s,  f' = (1-s)^a [(1-s) - a s log s];
    negatives: f = (1-y)^b s^a log(1-s),  f' = (1-y)^b s^a [a (1-s) log(1-s) - s].
    """
    positive = y == 1
    log_p = F.logsigmoid(x)
    log_not_p = log_p - x
    # log of the modulating base: (1-s) for positives, s for negatives
    log_base = torch.where(positive, log_not_p, log_p)
    log_term = torch.where(positive, log_p, log_not_p)
    weight = (1 - y).pow_(beta).masked_fill_(positive, 1.0)
    scale = weight.mul_(torch.exp(log_base.mul_(alpha)))  # weight * base^alpha
    value = scale * log_term
    if not need_grad:
        return value, None
    prob = torch.exp(log_p)
    not_prob = torch.exp(log_not_p)
    # positives: (1-s) - a s log s ; negatives: a (1-s) log(1-s) - s
    inner = torch.where(positive, not_prob - alpha * prob * log_term, alpha * not_prob * log_term - prob)
    return value, scale.mul_(inner)


class _FocalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        x = logits.detach().reshape(-1)
        y = target.detach().reshape(-1)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        grad = torch.empty(x.shape, dtype=torch.float32, device=logits.device) if need_grad else None
        with torch.autocast(device_type=logits.device.type, enabled=False):
            chunk = _CPU_CHUNK if x.device.type == "cpu" else max(x.numel(), 1)
            for start in range(0, x.numel(), chunk):
                stop = start + chunk
                value, dvalue = _focal_terms(x[start:stop].float(), y[start:stop].float(), alpha, beta, need_grad)
                total += value.sum()
                if grad is not None:
                    grad[start:stop] = dvalue
        num_pos = (target == 1).sum().clamp_(min=1).float()
        if grad is not None:
            ctx.save_for_backward(grad, num_pos)
            ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        return -total / num_pos

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad, num_pos = ctx.saved_tensors
        scale = -grad_output / num_pos
        return (grad * scale).reshape(ctx.logits_shape).to(ctx.logits_dtype), None, None, None


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """Penalty-reduced pixel-wise focal loss (CornerNet/CenterNet), averaged over positives.

    Args:
        logits: [B, C, H, W] pre-sigmoid heatmap predictions (any float dtype).
        target: [B, C, H, W] Gaussian target heatmap in [0, 1]; exactly 1 at object centres.
    Returns:
        scalar float32 tensor: -1/N * sum(pos + neg terms), N = number of positives (1 if none).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    return _FocalLoss.apply(logits, target, float(alpha), float(beta))


def gather_at(feature: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Values of a [B, D, H, W] map at flat positions ``index`` [B, M] (y * W + x) -> [B, M, D]."""
    batch, channels = feature.shape[:2]
    flat = feature.reshape(batch, channels, -1)
    return flat.gather(2, index.unsqueeze(1).expand(-1, channels, -1)).transpose(1, 2)


def masked_l1_loss(prediction: torch.Tensor, target: torch.Tensor, index: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """L1 between ``prediction`` [B, 2, H, W] gathered at ``index`` [B, M] and ``target`` [B, M, 2].

    Only slots with ``mask`` [B, M] == 1 count. The sum is averaged over the 2N coordinates of the
    N real objects, as the official ``RegL1Loss`` (which divides by ``2N + 1e-4``) and MMDetection
    do: one object with target (10, 20) and prediction 0 gives 15. 0 when there are no objects.
    """
    gathered = gather_at(prediction, index).float()  # [B, M, 2]
    weight = mask.unsqueeze(2).expand_as(gathered).float()  # [B, M, 2]: one weight per coordinate
    loss = (F.l1_loss(gathered, target.float(), reduction="none") * weight).sum()
    return loss / weight.sum().clamp(min=1.0)


@dataclass
class LossWeights:
    heatmap: float = 1.0
    size: float = 0.1
    offset: float = 1.0


class CenterNetLoss(nn.Module):
    """Total = w_hm * focal + w_wh * L1(size) + w_off * L1(offset); returns every term by name.

    ``outputs``: the model's dict of heads, ``heatmap`` [B, C, H, W] logits, ``size`` and
    ``offset`` [B, 2, H, W] (any float dtype), plus, for models with intermediate supervision
    (Hourglass-104), ``aux``: a list of the earlier stacks' head dicts. Each term is averaged over
    the stacks, as the official ``CtdetLoss`` divides by ``num_stacks``.
    ``targets``: dict with ``heatmap`` [B, C, H, W], ``index`` [B, M], ``mask`` [B, M],
    ``size`` [B, M, 2], ``offset`` [B, M, 2].
    """

    def __init__(self, alpha: float = 2.0, beta: float = 4.0, weights: LossWeights | None = None) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.weights = weights or LossWeights()

    @classmethod
    def from_config(cls, config: LossConfig) -> "CenterNetLoss":
        return cls(config.alpha, config.beta, LossWeights(config.hm_weight, config.wh_weight, config.off_weight))

    def forward(self, outputs: dict[str, Any], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not isinstance(outputs, dict):
            raise TypeError(f"CenterNetLoss takes the model's dict of heads (earlier stacks under "
                            f"'{AUX_OUTPUTS}'); got {type(outputs).__name__}")
        stacks = [outputs, *outputs.get(AUX_OUTPUTS, ())]
        terms = {"heatmap": 0.0, "size": 0.0, "offset": 0.0}
        for out in stacks:
            terms["heatmap"] = terms["heatmap"] + focal_loss(out["heatmap"], targets["heatmap"], self.alpha, self.beta)
            terms["size"] = terms["size"] + masked_l1_loss(out["size"], targets["size"], targets["index"], targets["mask"])
            terms["offset"] = terms["offset"] + masked_l1_loss(
                out["offset"], targets["offset"], targets["index"], targets["mask"])
        terms = {name: value / len(stacks) for name, value in terms.items()}
        w = self.weights
        terms["total"] = w.heatmap * terms["heatmap"] + w.size * terms["size"] + w.offset * terms["offset"]
        return terms
