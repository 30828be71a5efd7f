"""MLflow from rank 0 only: one run per training job, resumed with the job."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from centernet_ray.config import Config

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(config: Config) -> str:
    return config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class RunTracker:
    """Thin wrapper over one MLflow run (created, or resumed from ``run_id``)."""

    def __init__(self, config: Config, run_name: str, run_id: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri(config))
        mlflow.set_experiment(config.tracking.experiment)
        if parent_run_id and run_id is None:  # a Tune trial: nested under the sweep's run
            tags = {**(tags or {}), "mlflow.parentRunId": parent_run_id}
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                                    tags=None if run_id else tags)
        self.run_id = self.run.info.run_id
        if run_id is None:
            mlflow.log_params({k: str(v)[:500] for k, v in config.flatten().items()})
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.yaml"
                path.write_text(config.to_yaml())
                mlflow.log_artifact(str(path))
        log.info("MLflow run %s at %s", self.run_id, tracking_uri(config))

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=folder)

    def model(self, model: Any, input_size: tuple[int, int], registered_name: str = "") -> None:
        """Log the model in MLflow's ``pt2`` format (a traced graph: loading it runs no pickle)."""
        import mlflow.pytorch
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, *input_size))]))
        # Batch 2, not 1: torch.export specialises a dimension whose example size is 0 or 1, which
        # would make the logged model reject every batch size but 1.
        example = np.zeros((2, 3, *input_size), dtype=np.float32)
        mlflow.pytorch.log_model(model.eval(), name="model", input_example=example, signature=signature,
                                 serialization_format="pt2", registered_model_name=registered_name or None)

    def close(self) -> None:
        self.mlflow.end_run()
