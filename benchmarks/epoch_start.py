"""The start of an epoch from ``data.cache``: how long two DDP workers wait for their first batch,
at different block sizes of the augmented rows.

    python -m benchmarks.epoch_start [--block-rows 256 64 32] [--images 2000] [--epochs 5]

A local Ray (8 logical CPUs), the demo config, ``--images`` synthetic 128x128 images ingested and
cached; each setting runs a ``TorchTrainer`` of 2 workers that read the train split as training
does (``CenterNetDataConfig``: an equal streaming split; ``shard_batches``: collated batches of 16)
for ``--epochs`` epochs without training, and times, per epoch after the first, the wait for the
first batch and the whole epoch. Only ``AUGMENT_BLOCK_ROWS`` changes (256 = one block per
augmentation task of 256 rows, as before it existed); settings alternate, twice over; medians are
printed with the ratio to the first setting.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.timing import cpu_kind


def read_epochs(cfg: dict[str, Any]) -> None:
    """A Ray Train worker: ``cfg["epochs"]`` epochs of its shard, timed; reported by every rank."""
    import ray
    import ray.train

    from centernet_ray.config import config_from_dict
    from centernet_ray.ray_data.pipeline import shard_batches

    config = config_from_dict(cfg["config"])
    epochs = []
    for epoch in range(cfg["epochs"]):
        ray.get(cfg["clock"].set_epoch.remote(epoch))
        start, first = time.perf_counter(), None
        for _ in shard_batches("train", config, cfg["num_classes"], config.train.batch_size, epoch):
            first = first or time.perf_counter() - start
        epochs.append((first, time.perf_counter() - start))
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as directory:  # Ray Train V2 returns the metrics of a checkpoint
        Path(directory, "epochs.txt").write_text(repr(epochs))
        ray.train.report({"epochs": epochs},
                         checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-rows", type=int, nargs="+", default=[256, 64, 32])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5, help="per run; the first is not counted")
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from centernet_ray.config import load_config
    from centernet_ray.data.synthetic import write_shapes_dataset
    from centernet_ray.ray_data import cache
    from centernet_ray.ray_data.ingest import ingest_coco
    from centernet_ray.ray_data.pipeline import CenterNetDataConfig, EpochClock

    print(f"CPU kind: {cpu_kind()}")
    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = load_config("demo")
    first: dict[int, list[float]] = {rows: [] for rows in args.block_rows}
    whole: dict[int, list[float]] = {rows: [] for rows in args.block_rows}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shapes_dataset(Path(tmp) / "shapes", num_train=args.images, num_val=16, image_size=128, seed=1)
        parquet = {}
        for split in ("train", "val"):
            parquet[split] = str(Path(tmp) / "parquet" / split)
            ingested = ingest_coco(str(data / "images" / split), str(data / "annotations" / f"instances_{split}.json"),
                                   parquet[split])
        for rows in args.block_rows * 2:
            cache.AUGMENT_BLOCK_ROWS = rows
            clock = EpochClock.remote()
            train = cache.cached_datasets(parquet["train"], parquet["val"], config, clock=clock)["train"]
            trainer = TorchTrainer(
                read_epochs, train_loop_config={"config": config.to_dict(), "epochs": args.epochs, "clock": clock,
                                                "num_classes": len(ingested.class_names)},
                scaling_config=ScalingConfig(num_workers=config.train.num_workers, use_gpu=False),
                datasets={"train": train}, dataset_config=CenterNetDataConfig(),
                run_config=RunConfig(name=f"epoch-start-{uuid.uuid4().hex[:8]}", storage_path=str(Path(tmp) / "runs")))
            result = trainer.fit()
            if result.error is not None:
                raise result.error
            later = result.metrics["epochs"][1:]
            first[rows] += [epoch[0] for epoch in later]
            whole[rows] += [epoch[1] for epoch in later]
            print(f"  {rows:4d} rows/block  first batch {', '.join(f'{e[0]:.2f}' for e in later)} s; "
                  f"epoch {', '.join(f'{e[1]:.2f}' for e in later)} s", flush=True)
    base = args.block_rows[0]
    print(f"\n{config.train.num_workers} workers reading {args.images} cached rows per epoch without training, "
          f"medians of {len(first[base])} epochs")
    for rows in args.block_rows:
        wait, epoch = statistics.median(first[rows]), statistics.median(whole[rows])
        print(f"  {rows:4d} rows per block   first batch {wait:5.2f} s ({statistics.median(first[base]) / wait:4.2f}x "
              f"vs {base})   whole epoch {epoch:5.2f} s ({statistics.median(whole[base]) / epoch:4.2f}x)")


if __name__ == "__main__":
    main()
