"""``data.cache``: the deterministic part of preprocessing done once per cluster, kept in Ray's object store.

Without the cache every epoch decodes every image again. With it, before training starts:

- train rows go through ``Preprocessor.prepare`` (decode, drop bad rows, and for the ``flip`` and
  ``none`` presets the letterbox) and the result is materialised in the object store; each epoch
  runs only ``Preprocessor.augment`` (the random crop, flip and colours, and the sparse targets) on
  it, with that epoch's seed, so epochs still differ and equal the uncached pipeline's bit for bit.
  For the cropping presets that is a Ray Data stage on the CPU nodes every epoch; for the
  letterboxing presets, whose random part is a coin toss and a flip per row, each trainer does it
  in its collate (``pipeline.augments_on_the_trainer``): cheaper than the task that would carry
  the row, and Ray Data only hands the cached blocks out;
- validation rows are deterministic: they are preprocessed whole, once.

The blocks live in the object store of the nodes that made them, owned by the job's driver, and
every training process streams its share from there: one copy per cluster, however many workers
(a per-process RAM cache, as Ultralytics' ``cache=ram``, would hold one copy per rank). Ray spills
blocks to disk when the store is full, which works but costs a disk read per epoch; so the cache
is refused when its estimated size exceeds half of the cluster's object store (the other half is
for the blocks streaming to the trainers), unless ``data.cache_force``.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import RandomSeedConfig

from centernet_ray import storage
from centernet_ray.config import LETTERBOX_PRESETS, Config
from centernet_ray.data.preprocess import packed_row_bytes
from centernet_ray.errors import UserInputError
from centernet_ray.ray_data.ingest import read_manifest
from centernet_ray.ray_data.pipeline import augments_on_the_trainer, preprocess_stage, read_rows

log = logging.getLogger(__name__)

STORE_SHARE = 0.5  # of the cluster's object store the cache may fill without data.cache_force
BOX_BYTES = 4 * 4 + 8  # a box and its label, as the cache holds them
# Rows per augmentation task: the per-epoch work on a cached row is a fraction of a millisecond, so
# at data.preprocess_batch_size (32) rows a task, Ray's per-task cost was most of the stage's CPU:
# 1.49 ms of machine CPU per row at 32, 0.80 at 128, 0.69 at 256, 0.70 at 512
# (benchmarks/cache_augment.py). Augmentation seeds are per image: the grouping changes no row.
AUGMENT_TASK_ROWS = 256
# ...but its output goes to the trainers in blocks of about this many rows, not one block per task:
# two workers splitting 2,000 rows equally (benchmarks/epoch_start.py, no training) wait 0.54 s for
# an epoch's first batch with 256-row blocks, 0.33 s with 64 and 0.29 s with 32; smaller blocks cost
# more to hand over (the whole epoch: 1.41 s, 2.02 s, 2.09 s), which training at ~160 img/s hides.
AUGMENT_BLOCK_ROWS = 64


def estimate_bytes(parquet_dir: str, config: Config, train: bool) -> int:
    """Bytes the cache of one split holds: uint8 pixels at input size (validation, and training
    with the letterboxing presets) or at each image's own size (the cropping presets, which need the
    whole image every epoch), plus boxes. Read from the Parquet metadata and the width/height columns."""
    manifest = read_manifest(parquet_dir)
    if manifest is None:
        raise FileNotFoundError(f"no ingested dataset at {parquet_dir}")
    height, width = config.data.input_size
    letterboxed = not train or config.data.augment in LETTERBOX_PRESETS
    pixels = boxes = 0
    for name in manifest["shards"]:
        fs, path = storage.resolve(storage.join(parquet_dir, name))
        table = pq.read_table(path, columns=["width", "height", "labels"], filesystem=fs)
        if letterboxed:
            pixels += table.num_rows * height * width
        else:
            sides = [table.column(side).cast(pa.int64()) for side in ("width", "height")]
            pixels += pc.sum(pc.multiply(*sides)).as_py() or 0
        boxes += pc.sum(pc.list_value_length(table.column("labels"))).as_py() or 0
    return 3 * pixels + BOX_BYTES * boxes


def check_fits(needed: int, force: bool) -> None:
    """Refuse a cache larger than ``STORE_SHARE`` of the cluster's object store, unless ``force``."""
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    allowed = STORE_SHARE * store
    if needed <= allowed:
        log.info("data.cache: %.2f GB of decoded images in Ray's object store (%.2f GB in the cluster)",
                 needed / 1e9, store / 1e9)
        return
    if force:
        log.warning("data.cache: %.2f GB of decoded images exceed half of the cluster's %.2f GB object store; "
                    "Ray will spill the rest to disk (data.cache_force)", needed / 1e9, store / 1e9)
        return
    raise UserInputError(
        f"data.cache needs ~{needed / 1e9:.2f} GB of Ray's object store for the decoded images, more than half "
        f"of the cluster's {store / 1e9:.2f} GB (the rest streams batches to the trainers). Give the nodes more "
        "object store (`ray start --object-store-memory`, or more CPU nodes), train without the cache "
        "(data.cache=false), or set data.cache_force=true to let Ray spill the rest to disk.")


def cached_datasets(train_dir: str, val_dir: str, config: Config, *, report: Any = None,
                    clock: Any = None) -> dict[str, ray.data.Dataset]:
    """``train`` (the cached prepared rows, augmented each epoch) and ``val`` (cached whole), built
    now: this runs the decoding over the whole dataset before it returns."""
    check_fits(estimate_bytes(train_dir, config, True) + estimate_bytes(val_dir, config, False),
               config.data.cache_force)
    selector = config.cluster.data_selector()
    batch = config.data.preprocess_batch_size
    prepared = preprocess_stage(read_rows(train_dir, batch), config, train=True, report=report, method="prepare")
    val = preprocess_stage(read_rows(val_dir, batch), config, train=False, report=report)
    cached = {}
    for name, dataset in (("train", prepared), ("val", val)):
        dataset.context.execution_options.label_selector = selector  # reads included, as for the uncached pipeline
        cached[name] = dataset.materialize()
        log.info("data.cache: %s split cached: %d rows, %.1f MB", name, cached[name].count(),
                 cached[name].size_bytes() / 1e6)
    # a new block order every epoch (block references permuted: the rows stay where they are)
    shuffled = cached["train"].randomize_block_order(seed=RandomSeedConfig(config.train.seed,
                                                                           reseed_after_execution=True))
    if augments_on_the_trainer(config):  # each trainer flips its rows (shard_batches): no stage per epoch
        return {"train": shuffled, "val": cached["val"]}
    train = preprocess_stage(shuffled, config, train=True, report=report, clock=clock, method="augment",
                             batch_size=max(AUGMENT_TASK_ROWS, config.data.preprocess_batch_size))
    # Ray Data cuts a task's output into blocks of the target size (128 MiB by default)
    train.context.target_max_block_size = AUGMENT_BLOCK_ROWS * packed_row_bytes(config.data.input_size,
                                                                                config.targets.max_objects)
    return {"train": train, "val": cached["val"]}
