"""Ingest: a COCO dataset (images + instances json, local or any pyarrow URI) -> sharded Parquet.

The driver reads the annotation file; the images are read, checked and written to Parquet by one
Ray Data task per shard on the CPU pool (or in this process when Ray is not running).

One row per usable image: ``image_id``, ``file_name``, ``width``, ``height``, ``image`` (the
original encoded bytes), ``boxes`` (flat float32 x1, y1, x2, y2, ... in image pixels) and
``labels`` (int32 contiguous class indices). ``_manifest.json`` beside the shards holds the class
list, the shard names, the counts of everything dropped and a fingerprint of the input
(``centernet_ray/data/ingest_input.py``): rerunning on the same input finds the fingerprint and
rewrites nothing, while images added, fixed or removed since are ingested again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from centernet_ray import lease, storage
from centernet_ray.config import DataConfig
from centernet_ray.data.coco import CocoDataset, CocoReport, ImageRecord, parse_coco
from centernet_ray.data.image_check import read_checked_image
from centernet_ray.data.ingest_input import (FORMAT_VERSION, MANIFEST, IngestInput, annotated_files, describe_changes,
                                             require_some_images, write_annotated_files)
from centernet_ray.data.sources import split_sources
from centernet_ray.errors import UserInputError

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("file_name", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("image", pa.binary()), ("boxes", pa.list_(pa.float32())), ("labels", pa.list_(pa.int32())),
])


@dataclass
class IngestResult:
    output: str
    rows: int
    shards: list[str]
    category_ids: list[int]
    class_names: list[str]
    report: dict[str, int]
    bytes_written: int
    reused: bool  # True when an identical earlier ingest was found and nothing was rewritten
    fingerprint: str = ""  # sha256 of the annotation file, the image location, the listing of the files it names
    # and the shard size
    annotations_sha256: str = ""  # sha256 of the annotation file alone: the same file wherever it is


def read_manifest(output: str) -> dict | None:
    path = storage.join(output, MANIFEST)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_bytes(path))


def _load_image(images: str, file_name: str) -> tuple[bytes | None, str | None]:
    """(bytes, None), or (None, the problem) for a missing or unreadable image. Any other failure to
    read (object storage throttling or timing out, a permission) stops the ingest: a dropped image
    would be frozen into the manifest, which later runs reuse without reading again."""
    uri = storage.join(images, file_name)
    try:
        return read_checked_image(uri)
    except OSError as exc:
        raise OSError(f"cannot read {uri}: {exc}. Not a missing file: the ingest stops instead of dropping "
                      "it (nothing was recorded as ingested; an earlier ingest in the output is kept); rerun once the "
                      "storage answers") from exc


def _shard_records(records: list[ImageRecord]) -> str:
    """A shard's annotations as JSON text: what travels to the task that writes it (no image bytes)."""
    return json.dumps([[r.image_id, r.file_name, r.width, r.height, r.boxes.reshape(-1).tolist(),
                        r.labels.astype("int32").tolist()] for r in records])


def write_shard(images: str, output: str, index: int, records_json: str, num_threads: int, generation: str) -> dict:
    """Read and check the images of one shard (``num_threads`` reads at a time: object storage is
    latency-bound) and write ``output``/part-<generation>-<index>.parquet (``generation``: this
    ingest's, so that no file of the earlier ingest is overwritten). Returns what the manifest needs:
    the shard's name ("" when every image was dropped), rows, image bytes and the dropped images
    as [kind, example, annotations] (the image bytes stay here, never in the caller's memory)."""
    records = json.loads(records_json)
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    dropped = []
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        loaded = pool.map(lambda record: _load_image(images, record[1]), records)
        for (image_id, file_name, width, height, boxes, labels), (data, problem) in zip(records, loaded):
            if data is None:
                kind = "missing_images" if problem.startswith("missing") else "unreadable_images"
                dropped.append([kind, f"{file_name} ({problem[:80]})", len(labels)])
                continue
            for name, value in zip(SCHEMA.names, (image_id, file_name, width, height, data, boxes, labels)):
                columns[name].append(value)
    name, written = "", sum(len(b) for b in columns["image"])
    if columns["image_id"]:
        name = f"part-{generation}-{index:05d}.parquet"
        fs, path = storage.resolve(storage.join(output, name))
        with fs.open_output_stream(path) as sink:
            pq.write_table(pa.table(columns, schema=SCHEMA), sink)
    return {"index": index, "name": name, "rows": len(columns["image_id"]), "bytes": written,
            "dropped": json.dumps(dropped)}


def _write_shards_task(batch: dict[str, Any], *, images: str, output: str, num_threads: int,
                       generation: str) -> dict[str, Any]:
    """Ray Data ``map_batches`` body: one shard per row."""
    results = [write_shard(images, output, int(index), str(records), num_threads, generation)
               for index, records in zip(batch["index"], batch["records"])]
    return {key: [r[key] for r in results] for key in ("index", "name", "rows", "bytes", "dropped")}


def _write_shards(images: str, output: str, chunks: list[list[ImageRecord]], num_threads: int, generation: str,
                  label_selector: dict[str, str] | None, use_ray: bool | None) -> list[dict]:
    """Every shard written, by Ray Data tasks on the CPU pool (one task per shard, ``label_selector``
    honoured) when ``use_ray`` (None: when Ray is up), else here, one shard after another; results
    in shard order."""
    import ray

    if not (ray.is_initialized() if use_ray is None else use_ray):
        results = []
        for index, chunk in enumerate(chunks):
            results.append(write_shard(images, output, index, _shard_records(chunk), num_threads, generation))
            log.info("ingest: shard %d/%d written", index + 1, len(chunks))
        return results
    items = [{"index": index, "records": _shard_records(chunk)} for index, chunk in enumerate(chunks)]
    written = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _write_shards_task, batch_size=1, fn_kwargs=dict(images=images, output=output, num_threads=num_threads,
                                                       generation=generation),
        num_cpus=1, label_selector=label_selector)
    return sorted(written.take_all(), key=lambda r: r["index"])


def _reusable(output: str, found: IngestInput, images_changed_ok: bool, say_why: bool = True) -> IngestResult | None:
    """The ingest ``output`` holds, when it is one of this input (``found``), else None (said why,
    when ``say_why``). ``images_changed_ok`` (a sweep's trial): reused when only images changed;
    a ``UserInputError`` when the annotation file did."""
    previous = read_manifest(output)
    if previous and not previous["rows"] and any(previous["report"].get(k) for k in ("missing_images",
                                                                                     "unreadable_images")):
        previous = None  # every image dropped: what earlier versions wrote for a wrong image folder
    listed = found.as_listed_in(output, previous) if previous else found
    if previous and previous.get("annotations_sha256") == found.annotations_sha256:
        found = listed  # the same annotation file names the same files
    if previous and previous.get("fingerprint") == found.fingerprint:
        log.info("ingest: %s already holds this dataset (%d rows); nothing to do", output, previous["rows"])
        return _reused(output, previous, found.annotations_sha256)
    if images_changed_ok and previous and previous.get("annotations_sha256") not in (None, found.annotations_sha256):
        # else refused as "another command reads it": the sweep's own mark
        raise UserInputError(f"{previous['annotations']} changed since this trial's sweep ingested it into {output}, "
                             "which the sweep's other trials read: let the sweep end, or stop it and start a new one "
                             "(another tune.name) to train on the new annotations")
    if (images_changed_ok and previous and "images_listing" in previous
            and previous.get("fingerprint") == found.fingerprint_with(previous["images_listing"])):
        log.warning("ingest: the image files under %s changed since %s was written; this trial trains on it as it "
                    "is, as the sweep's other trials do (the next sweep or run ingests them again)", found.images,
                    output)
        return _reused(output, previous, found.annotations_sha256)
    if previous and say_why:
        log.info("ingest: %s holds %s: ingesting again", output,
                 describe_changes(previous, found.annotations_sha256, listed.listing))
    return None


def ingest_coco(images: str, annotations: str, output: str, shard_size: int = 1000,
                num_threads: int = 16, force: bool = False,
                label_selector: dict[str, str] | None = None, use_ray: bool | None = None,
                images_changed_ok: bool = False, before_writing: Callable[[], None] | None = None,
                reading: lease.Lease | None = None) -> IngestResult:
    """Write ``output``/part-<generation>-NNNNN.parquet shards of at most ``shard_size`` rows, plus
    the manifest, which replaces the earlier ingest's when all is written (its shards are then deleted).

    This process reads only the annotation file; with Ray up, every shard's images are read,
    checked and written by a Ray Data task (on nodes matching ``label_selector``), so neither the
    work nor the image bytes pass through here (``use_ray=False``: here, without Ray). A shard whose
    images were all dropped is not written (its number is skipped). ``images_changed_ok``: an
    ingest that differs only in the image files is reused with a warning, not written again (a
    sweep's trial: the other trials are reading its shards). ``before_writing`` is called once there
    is work to do, after the annotations are parsed and checked (``data ingest`` starts Ray there: a
    rerun with nothing to write, or a refused one, needs none). One command writes ``output`` at a
    time (a lease, ``centernet_ray/lease.py``): another that finds it being written waits, then
    reuses what it wrote when it is this input. ``reading``: the lease of a command that will read
    the ingest (a training run, a sweep), which marks ``output`` as read until it ends; an ingest
    that would replace the shards of one that another command reads is refused."""
    if shard_size < 1:
        raise UserInputError(f"shard_size must be >= 1; got {shard_size}")
    images, annotations = str(images), str(annotations)
    storage.require_bucket(output)
    annotation_bytes = storage.read_bytes(annotations)
    annotations_digest = hashlib.sha256(annotation_bytes)
    found = IngestInput.read(images, annotations_digest, shard_size)
    if not force:
        reusable = _reusable(output, found, images_changed_ok)
        if reusable and _marked_as_read(output, reading, reusable.fingerprint):
            return reusable
    with lease.held(output, what=f"the ingest into {output}", instead="Give this ingest its own output.",
                    wait=True) as writing:
        if writing.waited:  # listed again: the files another command wrote may lie among the images
            found = IngestInput.read(images, annotations_digest, shard_size)
        # looked at again: another command may have written it since, perhaps from this very input
        reusable = None if force else _reusable(output, found, images_changed_ok, say_why=writing.waited)
        if reusable is None:
            dataset = parse_coco(json.loads(annotation_bytes), annotations)
            require_some_images(dataset.images, images, annotations, found.files)
            lease.refuse_if_read(output, what=f"ingesting {annotations} would replace the shards in {output}",
                                 instead="ingest into another folder (data.parquet_dir, or data ingest's --out).")
            if before_writing is not None:
                before_writing()
            writing.confirm()  # before anything is deleted: a lease write that raced this one's and won
            reusable = _write_ingest(dataset, annotations, output, found, num_threads, label_selector, use_ray)
        if reading is not None:  # marked while no other command can be writing here
            reading.read(output)
        return reusable


def _marked_as_read(output: str, reading: lease.Lease | None, fingerprint: str) -> bool:
    """Mark ``output`` as read by ``reading``'s command, then make sure that no other command is
    writing it and that it still holds the ingest of ``fingerprint`` (else unmarked, False: wait for
    the writer, look again). In that order: a writer that did not see the mark had taken its lease
    before, and is seen here, or has written, and its manifest is seen here."""
    if reading is None:
        return True
    if reading.read_unless_written(output) is not None:
        return False
    if (read_manifest(output) or {}).get("fingerprint") == fingerprint:
        return True
    reading.stop_reading(output)
    return False


def _write_ingest(dataset: CocoDataset, annotations: str, output: str, found: IngestInput, num_threads: int,
                  label_selector: dict[str, str] | None, use_ray: bool | None) -> IngestResult:
    """Replace what ``output`` holds with the shards and manifest of ``dataset`` (of the input
    ``found``). The earlier ingest stays whole until the new manifest is written (its shards have
    other names), so an ingest that fails or is stopped midway leaves it as it was."""
    names = annotated_files(dataset.images)
    found = found.cut_to(names)
    images, shard_size = found.images, found.shard_size
    report: CocoReport = dataset.report
    fs, out_path = storage.resolve(output)
    fs.create_dir(out_path, recursive=True)
    _delete_shards_but(output, (read_manifest(output) or {}).get("shards", []))  # of one stopped midway

    chunks = [dataset.images[start:start + shard_size] for start in range(0, len(dataset.images), shard_size)]
    results = _write_shards(images, output, chunks, num_threads, secrets.token_hex(4), label_selector, use_ray)
    for result in results:
        for kind, example, annotations_dropped in json.loads(result["dropped"]):
            report.note(kind, example)
            report.annotations -= annotations_dropped
    shards = [r["name"] for r in results if r["name"]]
    rows, written = sum(r["rows"] for r in results), sum(r["bytes"] for r in results)

    report.images = rows
    if dataset.images and not rows:
        raise UserInputError(f"none of the {len(dataset.images)} images that {annotations} lists could be ingested "
                             f"from {images}: {report.summary()}. Nothing was ingested (what {output} held is kept)")
    counts = report.counts()
    manifest = {
        "format_version": FORMAT_VERSION, "fingerprint": found.fingerprint, "images": images,
        "annotations_sha256": found.annotations_sha256, "images_listing": found.listing,
        "annotations": annotations, "rows": rows, "shards": shards, "category_ids": dataset.category_ids,
        "class_names": dataset.class_names, "report": counts, "examples": report.examples, "bytes_written": written,
    }
    write_annotated_files(output, found.annotations_sha256, names)
    storage.write_whole(storage.join(output, MANIFEST), json.dumps(manifest, indent=1).encode())  # the commit
    _delete_shards_but(output, shards)  # the earlier ingest's
    level = logging.WARNING if report.examples else logging.INFO
    log.log(level, "ingest: %s -> %s: %s", annotations, output, report.summary())
    return IngestResult(output, rows, shards, dataset.category_ids, dataset.class_names, counts, written, reused=False,
                        fingerprint=found.fingerprint, annotations_sha256=found.annotations_sha256)


def _delete_shards_but(output: str, kept: list[str]) -> None:
    """Delete the shards in ``output`` other than ``kept``."""
    fs, out_path = storage.resolve(output)
    for info in fs.get_file_info(pa.fs.FileSelector(out_path, allow_not_found=True)):
        if info.base_name.startswith("part-") and info.base_name not in kept:
            fs.delete_file(info.path)


def _reused(output: str, manifest: dict, annotations_sha256: str) -> IngestResult:
    """The ingest ``output`` holds (its ``manifest``), reused as it is."""
    return IngestResult(output, manifest["rows"], manifest["shards"], manifest["category_ids"], manifest["class_names"],
                        manifest["report"], manifest["bytes_written"], reused=True, fingerprint=manifest["fingerprint"],
                        annotations_sha256=annotations_sha256)


def ingest_splits(config: DataConfig, label_selector: dict[str, str] | None = None,
                  images_changed_ok: bool = False, reading: lease.Lease | None = None) -> dict[str, IngestResult]:
    """Ingest every split to Parquet (a no-op for splits already ingested from the same input;
    ``images_changed_ok``, ``reading``: see ``ingest_coco``)."""
    return {split: ingest_coco(source.images, source.annotations, source.parquet, config.shard_size,
                               label_selector=label_selector, images_changed_ok=images_changed_ok, reading=reading)
            for split, source in split_sources(config).items()}
