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

from centernet_ray.checkpoint import CHECKPOINT_FILE, LoadedModel, model_from_checkpoint

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("models:/", "runs:/")


@dataclass
class ServedModel:
    loaded: LoadedModel
    source: str  # what the user gave
    version: str  # shown in every response


def load_served_model(source: str, device: str | torch.device = "cpu", tracking_uri: str | None = None) -> ServedModel:
    """The model behind ``source`` (checkpoint file/directory/URI or MLflow model URI) on ``device``."""
    if source.startswith(MLFLOW_SCHEMES):
        return _from_mlflow(source, device, tracking_uri)
    loaded = model_from_checkpoint(source, device)
    return ServedModel(loaded, source, f"{Path(source.rstrip('/')).name}@epoch{loaded.epoch}")


def _from_mlflow(uri: str, device: str | torch.device, tracking_uri: str | None) -> ServedModel:
    import mlflow
    from mlflow import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    if uri.startswith("runs:/"):
        run_id, version = uri[len("runs:/"):].split("/")[0], uri
    else:
        name, _, ref = uri[len("models:/"):].partition("@")
        if ref:
            model_version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.partition("/")
            if not number:
                raise ValueError(f"{uri}: name a version or an alias, e.g. models:/{name}@champion or models:/{name}/1")
            model_version = client.get_model_version(name, number)
        run_id, version = model_version.run_id, f"{model_version.name}/{model_version.version}"
    if not run_id:
        raise ValueError(f"{uri} has no source run to take the checkpoint from")
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoint/{CHECKPOINT_FILE}",
                                                   dst_path=tmp)
        loaded = model_from_checkpoint(path, device)
    log.info("serving %s: run %s, epoch %d", uri, run_id, loaded.epoch)
    return ServedModel(loaded, uri, version)
