"""Batch inference on Ray Data: read -> the training pipeline's preprocessing stage (CPU pool) ->
model + decode (actor pool, GPU pool when the cluster has one) -> COCO results json + Parquet,
scored with COCOeval on request."""

from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from centernet_ray import lease, ray_runtime, storage
from centernet_ray.checkpoint import (is_mlflow_uri, load_served_model, names_an_alias, read_checkpoint,
                                      resolve_model_uri)
from centernet_ray.config import Config, with_overrides
from centernet_ray.data.coco import parse_coco
from centernet_ray.data.ingest_input import MANIFEST
from centernet_ray.detector import Detector
from centernet_ray.errors import UserInputError
from centernet_ray.evaluation import coco_evaluate, coco_from_dict, detections_to_coco, format_stats
from centernet_ray.ray_data.ingest import read_manifest
from centernet_ray.ray_data.pipeline import PipelineReport, preprocess_stage, preprocessing_min_cpus, read_rows
from centernet_ray.ray_runtime import check_node_labels, check_resources, counted, warn_if_in_job_working_dir

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DetectorActor:
    """Ray Data UDF: loads the checkpoint once per actor; emits the top ``k`` detections per image
    padded to fixed shapes (boxes [B, K, 4] original px, scores [B, K], classes [B, K])."""

    def __init__(self, checkpoint: str, use_gpu: bool, k: int, flip_test: bool, tracking_uri: str | None = None) -> None:
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        loaded = load_served_model(checkpoint, device, tracking_uri).loaded
        self.detector = Detector(loaded.model, loaded.config.data.input_size, device, flip_test)
        self.k = k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        found = self.detector.detect(torch.from_numpy(batch["image"].copy()), torch.from_numpy(batch["input_to_original"].copy()),
                                     torch.from_numpy(batch["original_size"].copy()), self.k, score_threshold=-1.0)
        k = max((len(d.scores) for d in found), default=0)
        boxes = np.zeros((len(found), k, 4), np.float32)
        scores = np.zeros((len(found), k), np.float32)
        classes = np.zeros((len(found), k), np.int32)
        for b, det in enumerate(found):
            boxes[b, : len(det.scores)], scores[b, : len(det.scores)], classes[b, : len(det.scores)] = det.boxes, det.scores, det.classes
        return {"image_id": batch["image_id"], "boxes": boxes, "scores": scores, "classes": classes}


@dataclass
class PredictResult:
    images: int
    detections: int
    skipped: dict[str, int]
    stats: dict[str, float] | None
    output: str
    wall_seconds: float


def list_images(images: str) -> list[str]:
    """Image files under a directory or URI, recursively, sorted (URIs kept as URIs)."""
    if storage.kind(images) != "folder":
        raise UserInputError(f"no image folder at {images}")
    fs, root = storage.resolve(images)
    infos = fs.get_file_info(pa.fs.FileSelector(root, recursive=True))
    found = sorted(info.path for info in infos if info.is_file and PurePosixPath(info.path).suffix.lower() in IMAGE_SUFFIXES)
    if storage.is_uri(images):
        scheme = images.split("://", 1)[0]
        return [f"{scheme}://{path}" for path in found]
    return found


def _image_rows(images: str, annotations: dict | None) -> tuple[list[dict[str, Any]], dict[int, str], int]:
    """(rows to predict, image id -> path, annotated images without a file). Without annotations the
    images are numbered 1..N in path order."""
    paths = list_images(images)
    if not paths:
        raise FileNotFoundError(f"no image files under {images}")
    if annotations is None:
        rows = [{"path": p, "image_id": i + 1} for i, p in enumerate(paths)]
        return rows, {row["image_id"]: row["path"] for row in rows}, 0
    prefix = storage.resolve(images)[1].rstrip("/") + "/"
    ids = {posixpath.normpath(img["file_name"]): int(img["id"]) for img in annotations["images"]}
    rows, found, unannotated = [], set(), []
    for path in paths:
        relative = storage.resolve(path)[1][len(prefix):]
        if relative in ids:
            rows.append({"path": path, "image_id": ids[relative]})
            found.add(relative)
        else:
            unannotated.append(relative)
    if not rows:
        raise UserInputError(f"none of the {len(paths)} images under {images} (e.g. {unannotated[0]}) is in "
                             f"--annotations, whose {len(ids)} file names are others "
                             f"(e.g. {min(ids, default='none')}): are they the images it annotates?")
    if unannotated:
        log.warning("predict: %d image(s) under %s are not in the annotations; skipped (e.g. %s)", len(unannotated),
                    images, ", ".join(unannotated[:3]))
    missing = sorted(set(ids) - found)
    if missing:  # their objects are left out of the scores, as training's evaluation leaves out what ingest dropped
        log.warning("predict: %d annotated image(s) have no file under %s (e.g. %s): not scored", len(missing),
                    images, ", ".join(missing[:3]))
    return rows, {row["image_id"]: row["path"] for row in rows}, len(missing)


def _pinned(checkpoint: str, tracking_uri: str) -> str:
    """An alias (``models:/name@champion``) as the version it names now (``models:/name/3``): the
    driver and every actor, started or restarted later, load the same model, and the log says which."""
    if not names_an_alias(checkpoint):
        return checkpoint
    _, version = resolve_model_uri(checkpoint, tracking_uri)
    log.info("predict: %s is version %s", checkpoint, version)
    return f"models:/{version}"


def check_actors_fit(config: Config, num_actors: int, use_gpu: bool) -> None:
    """The model actors (one CPU each, as Ray Data's default, and a GPU each with ``use_gpu``) and the
    preprocessing stage's least CPUs, refused where the Ray this command started has fewer: the
    actors would hold every CPU while the preprocessing waited for one, for ever."""
    preprocessing = preprocessing_min_cpus(config.data)
    need = {"CPU": num_actors + preprocessing, "GPU": float(num_actors) if use_gpu else 0.0}

    def fewer_actors(resource: str, has: float) -> str:
        most = int(has - preprocessing) if resource == "CPU" else int(has)
        return f"lower --actors (at most {most} fit)" if most >= 1 else "lower data.preprocess_num_cpus"

    check_resources(need, f"{counted(num_actors, 'model actor')} (--actors {num_actors}) and the preprocessing",
                    fewer_actors)


def _mark_as_read(parquet: str, reading: lease.Lease) -> None:
    """Mark the ingest ``parquet`` as read by this command until it ends: an ingest that would replace
    its shards meanwhile is refused (``lease.refuse_if_read``), as for a training run. Credentials
    that may read the dataset but not write there: warned, and read unmarked."""
    try:
        writer = reading.read_unless_written(parquet)
    except OSError as exc:
        log.warning("cannot mark %s as read (%s): an ingest into it while this command runs is not refused",
                    parquet, exc)
        return
    if writer is not None:
        raise UserInputError(f"{parquet} is being ingested now by {lease.describe(writer)}: run this once it ends")


def run_predict(checkpoint: str, output: str, images: str | None = None, parquet: str | None = None,
                annotations: str | None = None, batch_size: int = 16, num_actors: int = 1,
                k: int = 100, score_threshold: float = 0.0, flip_test: bool = False,
                tracking_uri: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PredictResult:
    """Detect on every image and write ``output``/detections.json (+ .parquet, metrics.json).

    ``checkpoint``: a checkpoint file/directory/URI or an MLflow model URI (``models:/name@alias``,
    ``runs:/<id>/model``) in ``tracking_uri`` (default: ``$MLFLOW_TRACKING_URI``, else
    ``./mlflow.db``). The checkpoint's config, with ``overrides`` (``key=value``, e.g.
    ``cluster.node_pools=false``) applied, sets the preprocessing stage and the node pools. Local
    paths are resolved here: the actors run in Ray's session folder. Ray is joined or started
    (``init_ray``) once the checkpoint, the annotations and the images are found."""
    if (images is None) == (parquet is None):
        raise UserInputError("give exactly one of --images and --parquet")
    started = time.perf_counter()
    tracking_uri = storage.tracking_uri(tracking_uri or "")
    if is_mlflow_uri(checkpoint):
        storage.require_tracking_server(tracking_uri)  # here, once: not in every actor that loads the model
        checkpoint = _pinned(checkpoint, tracking_uri)
    else:
        checkpoint = storage.absolute(checkpoint)
    images, parquet = storage.absolute(images or "") or None, storage.absolute(parquet or "") or None
    output, annotations = storage.absolute(output), storage.absolute(annotations or "") or None
    warn_if_in_job_working_dir(output, "predict's --output", "give a bucket URI or a lasting path")
    state = read_checkpoint(checkpoint, tracking_uri)  # the config and classes; the actors load the weights
    config, category_ids = with_overrides(state["config"], overrides), state["category_ids"]
    ground_truth = json.loads(storage.read_bytes(annotations)) if annotations else None
    if ground_truth is not None:
        parse_coco(ground_truth, annotations)  # validate early with a clear error

    missing = 0
    if images is not None:
        rows, id_to_path, missing = _image_rows(images, ground_truth)
    elif read_manifest(parquet) is None:  # before Ray, and before a mark would create the folder
        raise UserInputError(f"no ingested dataset at {parquet} (no {MANIFEST}: `centernet-ray data ingest` "
                             "writes one)")
    with lease.held(output, what=f"the predictions in {output}", instead="Give this command its own --output."
                    ) as writing:  # another command writing the same files would mix both runs' outputs
        if parquet is not None:
            _mark_as_read(parquet, writing)
        ray_runtime.init_ray()  # once what needs no Ray is checked: a mistake answers in a second
        if images is not None:
            dataset = ray.data.from_items(rows)
        else:
            dataset, id_to_path = read_rows(parquet, batch_size), {}
        image_ids, results, skipped = _detect(dataset, config, category_ids, checkpoint, tracking_uri,
                                              batch_size=batch_size, num_actors=num_actors, k=k,
                                              score_threshold=score_threshold, flip_test=flip_test)
        _write_detections(output, results, id_to_path if ground_truth is None else {})
        stats = None if ground_truth is None else _score(output, ground_truth, results, image_ids, missing, skipped)
    wall = time.perf_counter() - started
    log.info("predict: %d images, %d detections, skipped %s, %.1f s", len(image_ids), len(results),
             skipped or "none", wall)
    return PredictResult(len(image_ids), len(results), skipped, stats, output, wall)


def _detect(dataset: ray.data.Dataset, config: Config, category_ids: list[int], checkpoint: str, tracking_uri: str,
            *, batch_size: int, num_actors: int, k: int, score_threshold: float, flip_test: bool
            ) -> tuple[list[int], list[dict[str, Any]], dict[str, int]]:
    """The detections of every row of ``dataset``: (the image ids read, their COCO results, the
    preprocessing stage's counts of rows skipped, by problem)."""
    check_node_labels(config.cluster.data_selector(), "the preprocessing tasks")
    check_node_labels(config.cluster.train_selector(), "the model actors")
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    check_actors_fit(config, num_actors, use_gpu)
    report = PipelineReport.remote()
    # the training pipeline's preprocessing stage (compute strategy, CPUs, node pool), at this batch size
    preprocessed = preprocess_stage(dataset, config, train=False, report=report, batch_size=batch_size, max_objects=0,
                                    label_selector=config.cluster.data_selector())
    predicted = preprocessed.map_batches(
        DetectorActor, batch_format="numpy", batch_size=batch_size,
        fn_constructor_kwargs=dict(checkpoint=checkpoint, use_gpu=use_gpu, k=k, flip_test=flip_test,
                                   tracking_uri=tracking_uri),
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_gpus=1 if use_gpu else 0,
        label_selector=config.cluster.train_selector())

    image_ids: list[int] = []
    results: list[dict[str, Any]] = []
    for batch in predicted.iter_batches(batch_size=None, batch_format="numpy"):
        for b in range(len(batch["image_id"])):
            image_ids.append(int(batch["image_id"][b]))
            results += detections_to_coco(image_ids[-1:], batch["boxes"][b][None], batch["scores"][b][None],
                                          batch["classes"][b][None], category_ids, score_threshold)
    return image_ids, results, ray.get(report.get.remote())["counts"]


def _score(output: str, ground_truth: dict[str, Any], results: list[dict[str, Any]], image_ids: list[int],
           missing: int, skipped: dict[str, int]) -> dict[str, float]:
    """COCO stats of ``results`` over the images read (as training's evaluation scores the ingested
    ones), with the counts of annotated images missing and unreadable; also ``output``/metrics.json."""
    stats = coco_evaluate(coco_from_dict(ground_truth), results, image_ids=image_ids)
    stats.update(eval_images=float(len(image_ids)), missing_images=float(missing),
                 unreadable_images=float(skipped.get("unreadable_images", 0)))
    log.info("COCO stats:\n%s", format_stats(stats))
    storage.write_bytes(storage.join(output, "metrics.json"), json.dumps(stats, indent=2).encode())
    return stats


def _write_detections(output: str, results: list[dict[str, Any]], id_to_path: dict[int, str]) -> None:
    """``output``/detections.json and .parquet, and images.json when ``id_to_path``; what an earlier
    run into this folder wrote and this one does not (images.json, metrics.json) is removed, so that
    it cannot pass for this run's (metrics.json is written after this, when scored)."""
    storage.write_bytes(storage.join(output, "detections.json"), json.dumps(results).encode())
    table = pa.table({"image_id": [r["image_id"] for r in results], "category_id": [r["category_id"] for r in results],
                      "bbox": [r["bbox"] for r in results], "score": [r["score"] for r in results]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(output, "detections.parquet"), sink.getvalue().to_pybytes())
    for name in ("images.json", "metrics.json"):
        if storage.exists(storage.join(output, name)):
            fs, path = storage.resolve(storage.join(output, name))
            fs.delete_file(path)
    if id_to_path:
        storage.write_bytes(storage.join(output, "images.json"),
                            json.dumps({str(k): v for k, v in id_to_path.items()}, indent=1).encode())
