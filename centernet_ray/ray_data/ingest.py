"""Ingest: a COCO dataset (images + instances json, local or any pyarrow URI) -> sharded Parquet.

One row per usable image: ``image_id``, ``file_name``, ``width``, ``height``, ``image`` (the
original encoded bytes), ``boxes`` (flat float32 x1, y1, x2, y2, ... in image pixels) and
``labels`` (int32 contiguous class indices). ``_manifest.json`` beside the shards holds the class
list, the shard names, the counts of everything dropped and a fingerprint of the input: rerunning
on the same input finds the fingerprint and rewrites nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from centernet_ray import storage
from centernet_ray.config import DataConfig
from centernet_ray.data.coco import CocoReport, ImageRecord, parse_coco
from centernet_ray.data.sources import split_sources
from centernet_ray.errors import UserInputError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "_manifest.json"
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
    fingerprint: str = ""  # sha256 of the annotation file, the image location and the shard size


def check_image(data: bytes) -> str | None:
    """None when ``data`` decodes as an image, else the reason. JPEGs decode at 1/8 scale (draft
    mode), enough to catch truncation and corruption at a fraction of a full decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return None
    except Exception as exc:  # Pillow raises many types for bad bytes; all mean "unreadable"
        return f"{type(exc).__name__}: {exc}"


def _fingerprint(annotation_bytes: bytes, images: str, shard_size: int) -> str:
    fs, path = storage.resolve(images)  # "/data/x" and "file:///data/x" are the same input
    digest = hashlib.sha256(annotation_bytes)
    digest.update(f"|{fs.type_name}:{path}|{shard_size}|v{FORMAT_VERSION}".encode())
    return digest.hexdigest()


def read_manifest(output: str) -> dict | None:
    path = storage.join(output, MANIFEST)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_bytes(path))


def _load_image(images: str, record: ImageRecord) -> tuple[bytes | None, str | None]:
    uri = storage.join(images, record.file_name)
    try:
        data = storage.read_bytes(uri)
    except OSError as exc:
        return None, f"missing: {exc}"
    problem = check_image(data)
    return (None, problem) if problem else (data, None)


def ingest_coco(images: str, annotations: str, output: str, shard_size: int = 1000,
                num_threads: int = 16, force: bool = False) -> IngestResult:
    """Write ``output``/part-NNNNN.parquet shards of at most ``shard_size`` rows, plus the manifest."""
    if shard_size < 1:
        raise UserInputError(f"shard_size must be >= 1; got {shard_size}")
    annotation_bytes = storage.read_bytes(annotations)
    fingerprint = _fingerprint(annotation_bytes, str(images), shard_size)
    previous = read_manifest(output)
    if previous and previous.get("fingerprint") == fingerprint and not force:
        log.info("ingest: %s already holds this dataset (%d rows); nothing to do", output, previous["rows"])
        return IngestResult(output, previous["rows"], previous["shards"], previous["category_ids"],
                            previous["class_names"], previous["report"], previous["bytes_written"], reused=True,
                            fingerprint=fingerprint)

    dataset = parse_coco(json.loads(annotation_bytes), str(annotations))
    report: CocoReport = dataset.report
    fs, out_path = storage.resolve(output)
    fs.create_dir(out_path, recursive=True)
    for stale in fs.get_file_info(pa.fs.FileSelector(out_path)):  # shards of an earlier, different ingest
        if stale.base_name.startswith("part-") or stale.base_name == MANIFEST:
            fs.delete_file(stale.path)

    shards: list[str] = []
    rows = written = 0
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for start in range(0, len(dataset.images), shard_size):
            chunk = dataset.images[start:start + shard_size]
            columns: dict[str, list] = {name: [] for name in SCHEMA.names}
            for record, (data, problem) in zip(chunk, pool.map(lambda r: _load_image(images, r), chunk)):
                if data is None:
                    kind = "missing_images" if problem.startswith("missing") else "unreadable_images"
                    report.note(kind, f"{record.file_name} ({problem[:80]})")
                    report.annotations -= len(record.labels)
                    continue
                columns["image_id"].append(record.image_id)
                columns["file_name"].append(record.file_name)
                columns["width"].append(record.width)
                columns["height"].append(record.height)
                columns["image"].append(data)
                columns["boxes"].append(record.boxes.reshape(-1).tolist())
                columns["labels"].append(record.labels.astype("int32").tolist())
            if not columns["image_id"]:
                continue
            table = pa.table(columns, schema=SCHEMA)
            name = f"part-{len(shards):05d}.parquet"
            with fs.open_output_stream(f"{out_path}/{name}") as sink:
                pq.write_table(table, sink)
            shards.append(name)
            rows += table.num_rows
            written += sum(len(b) for b in columns["image"])
            log.info("ingest: shard %s, %d/%d images", name, min(start + shard_size, len(dataset.images)), len(dataset.images))

    report.images = rows
    counts = report.counts()
    manifest = {
        "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "images": str(images),
        "annotations": str(annotations), "rows": rows, "shards": shards, "category_ids": dataset.category_ids,
        "class_names": dataset.class_names, "report": counts, "examples": report.examples, "bytes_written": written,
    }
    storage.write_bytes(storage.join(output, MANIFEST), json.dumps(manifest, indent=1).encode())
    level = logging.WARNING if report.examples else logging.INFO
    log.log(level, "ingest: %s -> %s: %s", annotations, output, report.summary())
    return IngestResult(output, rows, shards, dataset.category_ids, dataset.class_names, counts, written, reused=False,
                        fingerprint=fingerprint)


def ingest_splits(config: DataConfig) -> dict[str, IngestResult]:
    """Ingest every split to Parquet (a no-op for splits already ingested from the same input)."""
    return {split: ingest_coco(source.images, source.annotations, source.parquet, config.shard_size)
            for split, source in split_sources(config).items()}
