"""Where a served model comes from: a checkpoint path/URI, or an MLflow model URI.

An MLflow model URI (``models:/name@alias``, ``models:/name/3``, ``runs:/<run id>/model``) is
resolved to the training run that logged it, and that run's ``checkpoint/checkpoint.pt`` artifact
is loaded. Loading the checkpoint (``weights_only=True``) instead of the logged pt2 program keeps
one loading path, and the checkpoint carries what the endpoint reports: class names, COCO category
ids, input size, epoch.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from centernet_ray.checkpoint import CHECKPOINT_FILE, LoadedModel, load_checkpoint, model_from_checkpoint
from centernet_ray.errors import UserInputError

log = logging.getLogger(__name__)

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


def read_checkpoint(source: str, tracking_uri: str | None = None) -> dict:
    """The checkpoint dict behind ``source`` (file/directory/URI or MLflow model URI), without
    building the model: for a driver that needs the config and classes, not the weights."""
    if not is_mlflow_uri(source):
        return load_checkpoint(source)
    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(fetch_checkpoint(source, tmp, tracking_uri)[0])


def fetch_checkpoint(uri: str, directory: str, tracking_uri: str | None = None) -> tuple[str, str, str]:
    """Download the checkpoint behind an MLflow model URI into ``directory``.

    Returns (local checkpoint path, the source run id, a version label: ``name/3`` or the URI)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if uri.startswith("runs:/"):
        run_id, version = uri[len("runs:/"):].split("/")[0], uri
    else:
        name, _, ref = uri[len("models:/"):].partition("@")
        if ref:
            model_version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.partition("/")
            if not number:
                raise UserInputError(f"{uri}: name a version or an alias, e.g. models:/{name}@champion or models:/{name}/1")
            model_version = client.get_model_version(name, number)
        run_id, version = model_version.run_id, f"{model_version.name}/{model_version.version}"
    if not run_id:
        raise UserInputError(f"{uri} has no source run to take the checkpoint from")
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoint/{CHECKPOINT_FILE}",
                                               dst_path=directory, tracking_uri=tracking_uri)
    return path, run_id, version


def _from_mlflow(uri: str, device: str | torch.device, tracking_uri: str | None) -> ServedModel:
    with tempfile.TemporaryDirectory() as tmp:
        path, run_id, version = fetch_checkpoint(uri, tmp, tracking_uri)
        loaded = model_from_checkpoint(path, device)
    log.info("serving %s: run %s, epoch %d", uri, run_id, loaded.epoch)
    return ServedModel(loaded, uri, version)
