"""The per-epoch stage of ``data.cache``: CPU per row at different rows per augmentation task.

    python -m benchmarks.cache_augment [--rows 32 128] [--images 2000]

A local Ray (8 logical CPUs), the demo config with ``data.augment=centernet`` (with a letterboxing
preset, as the demo's ``flip``, the trainers augment the cached rows and there is no such stage),
``--images`` synthetic 128x128 images ingested and cached; each setting builds the cache, then
streams epochs 1 and 2 of the augmented train split into this process in batches of 16 (epoch 0
is untimed) and measures the CPU time of every process on the machine per row. Settings
alternate, twice over; medians are printed with the ratio to the first setting. Only ``AUGMENT_TASK_ROWS`` changes: the rows are the same (seeds are
per image).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.timing import cpu_kind


def machine_cpu_seconds() -> float:
    import psutil

    total = 0.0
    for process in psutil.process_iter():
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 128], help="rows per augmentation task")
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()

    import ray

    from centernet_ray.config import load_config
    from centernet_ray.data.synthetic import write_shapes_dataset
    from centernet_ray.ray_data import cache
    from centernet_ray.ray_data.ingest import ingest_coco
    from centernet_ray.ray_data.pipeline import EpochClock

    print(f"CPU kind: {cpu_kind()}")
    ray.init(num_cpus=8, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = load_config("demo", ["data.augment=centernet"])
    per_row: dict[int, list[float]] = {rows: [] for rows in args.rows}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shapes_dataset(Path(tmp) / "shapes", num_train=args.images, num_val=16, image_size=128, seed=1)
        for split in ("train", "val"):
            ingest_coco(str(data / "images" / split), str(data / "annotations" / f"instances_{split}.json"),
                        str(Path(tmp) / "parquet" / split))
        for rows in args.rows * 2:
            cache.AUGMENT_TASK_ROWS = rows
            clock = EpochClock.remote()
            train = cache.cached_datasets(str(Path(tmp) / "parquet" / "train"), str(Path(tmp) / "parquet" / "val"),
                                          config, clock=clock)["train"]
            for epoch in range(3):
                ray.get(clock.set_epoch.remote(epoch))
                cpu, start = machine_cpu_seconds(), time.perf_counter()
                count = sum(len(batch["image_id"]) for batch in train.iter_batches(batch_size=16, batch_format="numpy"))
                cpu, seconds = machine_cpu_seconds() - cpu, time.perf_counter() - start
                if epoch:
                    per_row[rows].append(cpu / count * 1e3)
                    print(f"  {rows:4d} rows/task  epoch {epoch}: {count} rows in {seconds:.1f} s, "
                          f"{cpu / count * 1e3:.2f} ms of machine CPU per row", flush=True)
    base = statistics.median(per_row[args.rows[0]])
    print(f"\nmachine CPU per cached row, median of {len(per_row[args.rows[0]])} epochs")
    for rows, values in per_row.items():
        median = statistics.median(values)
        print(f"  {rows:4d} rows per augmentation task   {median:6.2f} ms/row   {base / median:5.2f}x vs {args.rows[0]}")


if __name__ == "__main__":
    main()
