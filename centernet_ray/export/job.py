"""``centernet-ray export``: checkpoint -> ONNX file, checked against PyTorch, logged to MLflow.

The check's numbers and the ONNX file go to the MLflow run that trained the checkpoint (checkpoints
carry their run id) under ``onnx/``; a checkpoint without one gets a new run named ``export``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from centernet_ray import storage
from centernet_ray.checkpoint import fetch_checkpoint, is_mlflow_uri, load_checkpoint, model_from_state
from centernet_ray.export.check import ExportCheck, check_export
from centernet_ray.export.graph import export_onnx

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
REPORT_FILE = "export.json"


@dataclass
class ExportResult:
    onnx_path: str  # where the graph was written: a local path or, for a URI output, its URI
    onnx_bytes: int
    check: ExportCheck | None  # None with check=False
    mlflow_run_id: str | None


def run_export(source: str, output: str | Path, k: int = 100, check: bool = True, max_images: int | None = None,
               images: str | None = None, annotations: str | None = None, tracking_uri: str | None = None,
               log_to_mlflow: bool = True) -> ExportResult:
    """Export the checkpoint behind ``source`` (path/URI or MLflow model URI) to ``output``/model.onnx
    (a folder or a URI: then written here and copied there), check it on the validation set (or
    ``images``/``annotations``) and log both to MLflow."""
    from centernet_ray.storage import tracking_uri as resolve_tracking_uri

    remote = storage.is_uri(output)
    if is_mlflow_uri(source):
        storage.require_tracking_server(resolve_tracking_uri(tracking_uri or ""))
    with tempfile.TemporaryDirectory() as tmp:
        run_id = None
        path, version = source, Path(source.rstrip("/")).name
        if is_mlflow_uri(source):
            path, run_id, version = fetch_checkpoint(source, tmp, tracking_uri)
        state = load_checkpoint(path)  # read once: the model and the run it was trained in
        run_id = run_id or state.get("mlflow_run_id")
        loaded = model_from_state(state)
    uri = resolve_tracking_uri(tracking_uri or loaded.config.tracking.tracking_uri)
    if log_to_mlflow:  # before the export and its check, not after them
        storage.require_tracking_server(uri)
    with tempfile.TemporaryDirectory() as staging:
        folder = Path(staging) if remote else Path(output).resolve()  # the report names the file wherever it is read
        (folder / REPORT_FILE).unlink(missing_ok=True)  # an earlier export's report must not outlive its model
        onnx_path = export_onnx(loaded, folder / ONNX_FILE, k, f"{version}@epoch{loaded.epoch}")
        written = storage.join(output, ONNX_FILE) if remote else str(onnx_path)
        result = check_export(loaded, onnx_path, max_images=max_images, images=images, annotations=annotations) if check else None
        report = {"source": source, "onnx": written, "epoch": loaded.epoch, "max_detections": k,
                  "check": result.to_json() if result else None}
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
        if remote:  # before MLflow records an export that is not where its report says
            storage.copy_folder(folder, output)
        if log_to_mlflow:
            run_id = log_export(uri, loaded.config.tracking.experiment, run_id, folder, result)
        return ExportResult(written, onnx_path.stat().st_size, result, run_id if log_to_mlflow else None)


def log_export(uri: str, experiment: str, run_id: str | None, folder: Path, result: ExportCheck | None) -> str:
    """Log ``folder``'s ONNX file and report (``onnx/``) and the check's metrics to run ``run_id`` of
    store ``uri`` (a new ``export`` run in ``experiment`` when the run is unknown or gone)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    if run_id is not None:
        try:
            client.get_run(run_id)
        except MlflowException:
            log.warning("the checkpoint's MLflow run %s is not in %s: logging the export to a new run", run_id, uri)
            run_id = None
    if run_id is None:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run_id = client.create_run(experiment_id, run_name="export").info.run_id
        client.set_terminated(run_id)
    client.log_artifact(run_id, str(folder / ONNX_FILE), "onnx")
    client.log_artifact(run_id, str(folder / REPORT_FILE), "onnx")
    if result is not None:
        for name, value in result.metrics().items():
            client.log_metric(run_id, name, value)
    log.info("export logged to MLflow run %s (%s)", run_id, uri)
    return run_id


def format_export(result: ExportResult) -> str:
    lines = [f"wrote {result.onnx_path} ({result.onnx_bytes / 1e6:.1f} MB)"]
    check = result.check
    if check is not None:
        skipped = f" ({check.skipped_images} missing or unreadable, skipped)" if check.skipped_images else ""
        lines += [f"checked on {check.images} validation images{skipped}: {check.matched_detections} detections matched, "
                  f"max |score diff| {check.max_score_diff:.2e}, max |box diff| {check.max_box_diff:.2e} px",
                  f"  AP    PyTorch {check.torch_ap:.4f}  ONNX {check.onnx_ap:.4f}",
                  f"  AP50  PyTorch {check.torch_ap50:.4f}  ONNX {check.onnx_ap50:.4f}",
                  f"  ms/image (CPU, this process)  PyTorch {check.torch_ms_per_image:.1f}  ONNX {check.onnx_ms_per_image:.1f}",
                  "  check: passed" if check.passed else f"  check: FAILED: {check.reason}"]
    if result.mlflow_run_id:
        lines.append(f"MLflow run {result.mlflow_run_id} (artifacts onnx/)")
    return "\n".join(lines)
