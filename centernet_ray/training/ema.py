"""An exponential moving average (EMA) of the model's weights, as common detectors keep one.

``torch.optim.swa_utils.AveragedModel`` holds the copy and applies the update; the decay ramps
up as in YOLOX and Ultralytics, ``decay_t = decay * (1 - exp(-t / tau))`` after ``t`` updates,
so that the average follows the fast-moving weights of early training and settles later.
Buffers (BatchNorm running statistics) are averaged too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay(updates: int, decay: float, tau: float) -> float:
    """The decay applied at update number ``updates`` (1-based)."""
    return decay * (1.0 - math.exp(-updates / tau))


class WeightAverage:
    """The EMA of ``model``'s parameters and buffers; ``update`` after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float = 0.9998, tau: float = 2000.0) -> None:
        if not 0.0 < decay < 1.0 or tau <= 0:
            raise ValueError(f"EMA needs 0 < decay < 1 and tau > 0; got decay={decay}, tau={tau}")
        self.decay, self.tau = decay, tau
        self.updates = 0
        # The decay is computed here, on the host, from a Python counter: AveragedModel's own
        # counter lives on the model's device and reading it back would stall every step.
        self.averaged = AveragedModel(model, multi_avg_fn=self._lerp, use_buffers=True)

    @torch.no_grad()
    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _: Any) -> None:
        weight = 1.0 - ema_decay(self.updates, self.decay, self.tau)
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:  # integer buffers (BatchNorm's num_batches_tracked): follow the model
            for mine, theirs in zip(averaged, current):
                mine.copy_(theirs)

    def update(self, model: nn.Module) -> None:
        self.updates += 1
        self.averaged.update_parameters(model)

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class as the trained one)."""
        return self.averaged.module

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
        self.averaged.n_averaged.fill_(self.updates)
