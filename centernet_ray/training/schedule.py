"""Optimizer and learning-rate schedule from the training config (Ray-free)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from centernet_ray.config import TrainConfig, resolve_learning_rate


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD at the resolved learning rate (linear scaling rule unless ``lr`` is set)."""
    lr = resolve_learning_rate(config)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel per step, and the update is skipped on the device when the step's found-inf
    # flag is set (TrainingEngine.step), so a non-finite step costs no host synchronisation
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay, fused=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=config.weight_decay, nesterov=True, fused=True)


def lr_factor(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (counted from 0).

    Linear warm-up over ``warmup_epochs``, then x ``lr_gamma`` at each epoch in ``lr_steps``
    (``step``) or a cosine decay to 0 over the remaining epochs (``cosine``).
    """
    epoch = step / max(steps_per_epoch, 1)
    if config.warmup_epochs > 0 and epoch < config.warmup_epochs:
        return (epoch + 1 / max(steps_per_epoch, 1)) / config.warmup_epochs
    if config.schedule == "step":
        return config.lr_gamma ** sum(epoch >= boundary for boundary in config.lr_steps)
    span = max(config.epochs - config.warmup_epochs, 1e-9)
    progress = min(max((epoch - config.warmup_epochs) / span, 0.0), 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: Callable[[], TrainConfig], steps_per_epoch: int):
    """A per-step ``LambdaLR`` following :func:`lr_factor` for the settings ``config()`` returns at
    each step (a time budget changes the epoch count mid-run: :func:`fitted_schedule`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, config()))


def fitted_schedule(config: TrainConfig, epochs: float) -> TrainConfig:
    """``config``'s schedule stretched or shrunk to ``epochs``, which may end part-way through an
    epoch (5.6): a cosine decays to 0 at the new end; step boundaries (``lr_steps``) move in
    proportion, so 90 and 120 of 140 epochs become 45 and 60 of 70."""
    ratio = epochs / config.epochs
    return replace(config, epochs=epochs, lr_steps=tuple(max(1, round(b * ratio)) for b in config.lr_steps))
