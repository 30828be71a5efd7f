"""Checkpoints: one schema (model, optimizer, scheduler, grad scaler, EMA, epoch, config, classes,
metrics), saving and loading it, and the model behind a source a user names.

Everything stored is a tensor, a number, a string or a container of those, so checkpoints load
with ``torch.load(..., weights_only=True)``: a checkpoint from elsewhere cannot run code.

A source is a checkpoint path/URI or an MLflow model URI (``models:/name@alias``,
``models:/name/3``, ``runs:/<run id>/model``): the latter is resolved to the training run that
logged it, and that run's ``checkpoint/checkpoint.pt`` artifact is loaded. Loading the checkpoint
instead of the logged pt2 program keeps one loading path, and the checkpoint carries what the
endpoint reports: class names, COCO category ids, input size, epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from centernet_ray import storage
from centernet_ray.config import Config, ConfigError, config_from_dict
from centernet_ray.data.identity import DATA_LOCATION_KEYS
from centernet_ray.errors import UserInputError
from centernet_ray.model import CenterNet, build_model
from centernet_ray.model.pretrained import load_fitting
from centernet_ray.torch_files import load_torch_file

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
RUN_CONFIG_FILE = "config.yaml"  # the run's config beside its checkpoint: read without the weights
DATA_LOCATIONS_FILE = "data_locations.json"  # the dataset it trains on (data.identity.dataset_record), beside it too
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("model", "epoch", "config", "class_names", "category_ids", "metrics")  # what rebuilding a model reads

# What a run may change when it resumes under its name: how long it trains, how it is evaluated,
# checkpointed and fed, where it runs, and where its files are (local paths are made absolute where
# the command runs, which differs between the folders of a shared storage path and between the
# sessions of a Ray job; the backbone's start is in the checkpoint's weights). Everything else in
# these sections is what it learns. The dataset's locations are compared apart, as the command gave
# them, with its annotation files' content (data/identity.py).
RESUME_COMPARED_SECTIONS = ("model", "loss", "targets", "data", "train")
RESUMABLE_SETTINGS = frozenset({
    "train.epochs", "train.time_limit", "train.max_failures", "train.eval_every", "train.eval_flip_test",
    "train.checkpoint_every", "train.compile", "train.storage_path", "train.run_name", "train.use_gpu", "train.amp",
    "data.preprocess_compute", "data.preprocess_batch_size", "data.preprocess_min_actors",
    "data.preprocess_max_actors", "data.preprocess_num_cpus", "data.prefetch_batches", "data.cache",
    "data.cache_force", "data.parquet_dir", "data.shard_size", "data.shuffle_buffer_batches",
    *DATA_LOCATION_KEYS, "model.pretrained",
})


def learned_settings(config: Config) -> dict[str, Any]:
    """The settings of ``config`` that shape what a run learns (``RESUME_COMPARED_SECTIONS`` less
    ``RESUMABLE_SETTINGS``), by dotted key."""
    return {key: value for key, value in config.flatten().items()
            if key.split(".")[0] in RESUME_COMPARED_SECTIONS and key not in RESUMABLE_SETTINGS}


def changed_settings(trained: Config, resumed: Config) -> list[str]:
    """The learned settings (``section.key: old -> new``) that ``resumed`` changes in the run
    ``trained`` started: a resume with any of them would silently keep the run's weights, optimizer
    and schedule under settings they were not trained with."""
    old, new = learned_settings(trained), learned_settings(resumed)
    return [f"{key}: {old[key]!r} -> {new.get(key)!r}" for key in sorted(old) if old[key] != new.get(key)]


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


def inference_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` less what only a resume needs (optimizer, LR scheduler, grad scaler): the checkpoint
    a model is served, evaluated and exported from, as the run's MLflow artifact: a third of the
    size with Adam's two moments per weight (Hourglass-104's: 0.8 GB instead of 2.3 GB), a half with
    ``train.ema`` (its weight average stays: models are rebuilt with it)."""
    return {**state, "optimizer": None, "scheduler": None, "scaler": None}


def save_checkpoint(path: str | Path, state: dict[str, Any], filesystem: pafs.FileSystem | None = None) -> None:
    """Write ``state`` to a local path or URI, streamed (Hourglass-104's with its optimizer: 2.3 GB);
    with ``filesystem``, to that path inside it (``storage.open_output``)."""
    with storage.open_output(path, filesystem) as stream:
        torch.save(state, stream)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file (or a directory holding ``checkpoint.pt``) with ``weights_only=True``."""
    location = checkpoint_file(path)
    state = load_torch_file(location, map_location, what="a centernet-ray checkpoint")
    if not isinstance(state, dict) or state.get("schema_version") != SCHEMA_VERSION:
        raise UserInputError(f"{path} is not a centernet-ray checkpoint (schema {SCHEMA_VERSION})")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise UserInputError(f"{path} is a centernet-ray checkpoint without {', '.join(missing)}")
    if len(state["class_names"]) != len(state["category_ids"]):
        raise UserInputError(f"{path}: {len(state['class_names'])} class names and {len(state['category_ids'])} "
                             "category ids: they map one to one")
    return state


def checkpoint_file(path: str | Path) -> str:
    """The checkpoint file ``path`` names: itself, or the ``checkpoint.pt`` in the folder it names.
    ``FileNotFoundError`` when there is none; a ``UserInputError`` for a folder without one (a run's
    folder: the error names its checkpoints)."""
    location = str(path)
    if storage.exists(storage.join(location, CHECKPOINT_FILE)):
        location = storage.join(location, CHECKPOINT_FILE)
    if not storage.exists(location):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not storage.is_file(location):
        raise UserInputError(_not_a_checkpoint_folder(path))
    return location


def check_model_source(source: str, tracking_uri: str | None = None) -> None:
    """Refuse a ``source`` (as ``load_served_model`` takes it) that names nothing to load: no
    checkpoint at the path, a folder without one, or no such MLflow model, version or alias.
    Reads no weights and downloads nothing: for a driver before it starts what will load them."""
    if is_mlflow_uri(source):
        storage.require_tracking_server(storage.tracking_uri(tracking_uri or ""))
        resolve_model_uri(source, tracking_uri)
    else:
        checkpoint_file(source)


def _not_a_checkpoint_folder(folder: str | Path) -> str:
    """What a folder without ``checkpoint.pt`` is, for the error: a training run's folder names its
    checkpoints (``epoch_NNNN/``), to pick from."""
    held = [name for name in storage.subfolder_names(folder)  # not a recursive walk: it may be a home folder
            if storage.is_file(storage.join(str(folder), name, CHECKPOINT_FILE))]
    if not held:
        return f"{folder} holds no {CHECKPOINT_FILE}: give a checkpoint file or a folder that holds one"
    return (f"{folder} is a training run's folder, not one of its checkpoints: give one of "
            f"{', '.join(held)} (its summary names the best), e.g. {storage.join(str(folder), held[-1])}")


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
    return model_from_state(load_checkpoint(path), device)


def model_from_state(state: dict[str, Any], device: str | torch.device = "cpu") -> LoadedModel:
    """:func:`model_from_checkpoint` for a checkpoint dict already read (``load_checkpoint``)."""
    try:
        config = config_from_dict(state["config"])
    except ConfigError as exc:
        raise UserInputError(f"the checkpoint's config is not one this version of centernet-ray reads: {exc}") from None
    # the checkpoint's weights replace any pretrained ones: never download them here
    model = build_model(dataclasses.replace(config.model, pretrained=None), num_classes=len(state["class_names"]))
    ema = state.get("ema")
    weights = ema.get("weights") if isinstance(ema, dict) else state["model"]
    if not isinstance(weights, Mapping):
        raise UserInputError(f"the checkpoint's {'EMA ' if ema else ''}weights are a {type(weights).__name__}, not a "
                             "state dict")
    load_fitting(model, weights, f"the checkpoint's weights do not fit the {config.model.backbone} of its config "
                                 f"with {len(state['class_names'])} classes")
    model.to(device).eval()
    return LoadedModel(model, config, state["class_names"], state["category_ids"], state["epoch"], state["metrics"])


MLFLOW_SCHEMES = ("models:/", "runs:/")


@dataclass
class ServedModel:
    loaded: LoadedModel
    source: str  # what the user gave
    version: str  # shown in every response


def load_served_model(source: str, device: str | torch.device = "cpu", tracking_uri: str | None = None) -> ServedModel:
    """The model behind ``source`` (checkpoint file/directory/URI or MLflow model URI) on ``device``."""
    if is_mlflow_uri(source):
        return _from_mlflow(source, device, tracking_uri)
    loaded = model_from_checkpoint(source, device)
    return ServedModel(loaded, source, f"{Path(source.rstrip('/')).name}@epoch{loaded.epoch}")


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_SCHEMES)


def names_an_alias(source: str) -> bool:
    """Whether ``source`` is a registry alias (``models:/name@alias``), which can move."""
    return source.startswith("models:/") and "@" in source


def read_checkpoint(source: str, tracking_uri: str | None = None) -> dict:
    """The checkpoint dict behind ``source`` (file/directory/URI or MLflow model URI), without
    building the model: for a driver that needs the config and classes, not the weights."""
    if not is_mlflow_uri(source):
        return load_checkpoint(source)
    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(fetch_checkpoint(source, tmp, tracking_uri)[0])


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """The training run behind an MLflow model URI and a version label (``name/3``, or the URI for
    ``runs:/``), read from the tracking store without downloading anything; a ``UserInputError``
    when the store has no such run, model, version or alias."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        if uri.startswith("runs:/"):
            run_id = uri[len("runs:/"):].split("/")[0]
            client.get_run(run_id)
            return run_id, uri
        name, _, ref = uri[len("models:/"):].partition("@")
        if ref:
            model_version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.partition("/")
            if not number:
                raise UserInputError(f"{uri}: name a version or an alias, e.g. models:/{name}@champion or models:/{name}/1")
            model_version = client.get_model_version(name, number)
    except MlflowException as exc:  # no such run, model, version or alias in this store
        raise UserInputError(f"{uri}: {exc.message} (store: {tracking_uri or 'the default'})") from None
    if not model_version.run_id:
        raise UserInputError(f"{uri} has no source run to take the checkpoint from")
    return model_version.run_id, f"{model_version.name}/{model_version.version}"


def fetch_checkpoint(uri: str, directory: str, tracking_uri: str | None = None) -> tuple[str, str, str]:
    """Download the checkpoint behind an MLflow model URI into ``directory``.

    Returns (local checkpoint path, the source run id, a version label: ``name/3`` or the URI)."""
    import mlflow

    from mlflow.exceptions import MlflowException

    run_id, version = resolve_model_uri(uri, tracking_uri)
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoint/{CHECKPOINT_FILE}",
                                                   dst_path=directory, tracking_uri=tracking_uri)
    except MlflowException as exc:  # no such run, or a run without a checkpoint
        raise UserInputError(f"{uri}: no checkpoint/{CHECKPOINT_FILE} in run {run_id}: {exc.message}") from None
    return path, run_id, version


def _from_mlflow(uri: str, device: str | torch.device, tracking_uri: str | None) -> ServedModel:
    with tempfile.TemporaryDirectory() as tmp:
        path, run_id, version = fetch_checkpoint(uri, tmp, tracking_uri)
        loaded = model_from_checkpoint(path, device)
    log.info("serving %s: run %s, epoch %d", uri, run_id, loaded.epoch)
    return ServedModel(loaded, uri, version)
