"""One checkpoint schema: model, optimizer, scheduler, grad scaler, EMA, epoch, config, classes, metrics.

Everything stored is a tensor, a number, a string or a container of those, so checkpoints load
with ``torch.load(..., weights_only=True)``: a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from centernet_ray import storage
from centernet_ray.config import Config, config_from_dict
from centernet_ray.errors import UserInputError
from centernet_ray.model import CenterNet, build_model

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
SCHEMA_VERSION = 1


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model  # DistributedDataParallel


def checkpoint_state(model: nn.Module, config: Config, class_names: list[str], category_ids: list[int], epoch: int,
                     optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, scaler: Any = None,
                     metrics: dict[str, float] | None = None, ema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint dict (see module docstring). ``ema``: ``WeightAverage.state_dict()`` when the
    run keeps an EMA of its weights; models rebuilt from the checkpoint then load the EMA weights."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema,
        "epoch": int(epoch),
        "config": config.to_dict(),
        "class_names": list(class_names),
        "category_ids": [int(c) for c in category_ids],
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to a local path or URI."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file (or a directory holding ``checkpoint.pt``) with ``weights_only=True``."""
    location = str(path)
    if storage.exists(storage.join(location, CHECKPOINT_FILE)):
        location = storage.join(location, CHECKPOINT_FILE)
    if not storage.exists(location):
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(io.BytesIO(storage.read_bytes(location)), map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("schema_version") != SCHEMA_VERSION:
        raise UserInputError(f"{path} is not a centernet-ray checkpoint (schema {SCHEMA_VERSION})")
    return state


@dataclass
class LoadedModel:
    model: CenterNet
    config: Config
    class_names: list[str]
    category_ids: list[int]
    epoch: int
    metrics: dict[str, float]


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model a checkpoint was trained with, in eval mode on ``device``, with the weights it
    was evaluated with: the EMA when the run kept one, else the trained weights."""
    state = load_checkpoint(path)
    config = config_from_dict(state["config"])
    # the checkpoint's weights replace any pretrained ones: never download them here
    model = build_model(dataclasses.replace(config.model, pretrained=None), num_classes=len(state["class_names"]))
    ema = state.get("ema")
    model.load_state_dict(ema["weights"] if ema else state["model"])
    model.to(device).eval()
    return LoadedModel(model, config, state["class_names"], state["category_ids"], state["epoch"], state["metrics"])

