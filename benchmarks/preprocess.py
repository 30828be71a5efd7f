"""Preprocessing throughput: Ray Data actor pool vs torch DataLoader, bytes per row, transform cost.

    python -m benchmarks.preprocess [--images 400] [--workers 2]

Both pipelines run the same per-image function (``Preprocessor``: decode + augment + sparse
targets, 512x512 output) on the same 640x480 JPEGs with COCO-like object counts, with the same
number of worker processes, one after the other in this run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.timing import compare, report
from centernet_ray.data.images import decode_image
from centernet_ray.data.preprocess import Preprocessor
from centernet_ray.data.synthetic import render_image
from centernet_ray.targets import render_targets

INPUT = (512, 512)
CLASSES = 80


def write_jpegs(directory: Path, count: int) -> None:
    """640x480 JPEGs (cropped synthetic scenes) and a COCO json with their boxes, ~7 objects each."""
    import json

    images, annotations = [], []
    for index in range(count):
        canvas, boxes, labels = [], [], []
        while len(boxes) < 4:  # stitch scenes until there are enough objects (COCO averages ~7)
            image, found, classes = render_image(1, "train", index * 7 + len(canvas), 640)
            canvas.append(image)
            boxes += [b for b in found if b[3] <= 480]
            labels += [c for b, c in zip(found, classes) if b[3] <= 480]
        canvas[0].crop((0, 0, 640, 480)).save(directory / f"{index:05d}.jpg", quality=90)
        images.append({"id": index + 1, "file_name": f"{index:05d}.jpg", "width": 640, "height": 480})
        for box, label in zip(boxes, labels):
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1,
                                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])], "iscrowd": 0})
    categories = [{"id": i + 1, "name": f"c{i}"} for i in range(4)]
    (directory / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


class RowDataset(torch.utils.data.Dataset):
    """The same rows and the same per-image function, one row per __getitem__."""

    def __init__(self, rows: dict) -> None:
        self.rows = rows
        self.preprocessor = Preprocessor(INPUT, 128, train=True)

    def __len__(self) -> int:
        return len(self.rows["image_id"])

    def __getitem__(self, i: int) -> dict:
        torch.set_num_threads(1)
        return self.preprocessor({k: v[i:i + 1] for k, v in self.rows.items()})


def collate(items: list[dict]) -> dict:
    return {k: np.concatenate([item[k] for item in items]) for k in items[0]}


def timed_epoch(batches) -> tuple[float, float]:
    """(images/s over the whole epoch, images/s over its second half: the steady state after start-up)."""
    start = time.perf_counter()
    stamps, count = [], 0
    for batch in batches:
        count += len(batch["image_id"])
        stamps.append((time.perf_counter(), count))
    end = stamps[-1][0]
    half_time, half_count = next((t, c) for t, c in stamps if c >= count / 2)
    return count / (end - start), (count - half_count) / max(end - half_time, 1e-9)


def dataloader_batches(rows: dict, workers: int, batch_size: int):
    return torch.utils.data.DataLoader(RowDataset(rows), batch_size=batch_size, num_workers=workers,
                                       collate_fn=collate, shuffle=True)


def naive_v2_chain():
    """The straightforward torchvision v2 chain on a decoded tensor, per the issue's baseline."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    chain = v2.Compose([v2.RandomAffine(degrees=0, translate=(0.2, 0.2), scale=(0.6, 1.4)), v2.Resize(INPUT),
                        v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.4)])

    def run(data: bytes, boxes: np.ndarray, labels: np.ndarray):
        image = decode_image(data)
        bbs = tv_tensors.BoundingBoxes(torch.as_tensor(boxes).reshape(-1, 4), format="XYXY", canvas_size=image.shape[-2:])
        out_image, out_boxes = chain(tv_tensors.Image(image), bbs)
        render_targets(out_boxes.numpy()[None] / 4, labels[None], np.array([len(labels)]), CLASSES, (128, 128), 128)
        return out_image
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import ray

    from centernet_ray.config import load_config
    from centernet_ray.ray_data.ingest import ingest_coco
    from centernet_ray.ray_data.pipeline import preprocessed_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        write_jpegs(root / "images", args.images)
        ingest_coco(str(root / "images"), str(root / "images" / "instances.json"), str(root / "pq"), shard_size=50)
        table = pq.read_table(root / "pq").to_pydict()
        rows = {k: np.array(v, dtype=object) if k in ("image", "boxes", "labels") else np.array(v) for k, v in table.items()}

        # 1. CPU cost of the train transform itself, one core
        fused = Preprocessor(INPUT, 128, train=True)
        naive = naive_v2_chain()
        sample = 40
        per_image = compare({
            "v2 chain (affine+resize+flip+jitter)": lambda: [naive(rows["image"][i], np.asarray(rows["boxes"][i], np.float32),
                                                                   np.asarray(rows["labels"][i])) for i in range(sample)],
            "centernet_ray train transform": lambda: [
                render_targets(*(lambda o: (o["boxes"], o["classes"], o["num_boxes"]))(fused({k: v[i:i + 1] for k, v in rows.items()})),
                               CLASSES, (128, 128), 128) for i in range(sample)],
        }, repeats=3, warmup=1)
        print(f"train transform, decode + augment + encode targets, 640x480 -> 512x512, 1 thread, {sample} images")
        report("per image (ms shown per image x1000/sample)", {k: v / sample for k, v in per_image.items()},
               baseline="v2 chain (affine+resize+flip+jitter)")

        # 2. bytes per training row
        out = fused({k: v[:1] for k, v in rows.items()})
        ours = sum(v[0].nbytes for v in out.values())
        naive_bytes = 3 * INPUT[0] * INPUT[1] * 4 + CLASSES * (INPUT[0] // 4) * (INPUT[1] // 4) * 4
        print(f"\nbytes per training row: ours {ours:,d} (uint8 image + sparse targets) vs naive {naive_bytes:,d} "
              f"(float32 image + float32 {CLASSES}-class heatmap): {ours / naive_bytes:.3f}x")

        # 3. throughput: DataLoader vs Ray Data, same function, same worker count; cold epochs
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        config = load_config(None, ["data.input_size=[512,512]", f"data.preprocess_min_actors={args.workers}",
                                    f"data.preprocess_max_actors={args.workers}", f"data.preprocess_batch_size={args.batch_size}"])
        datasets = {}
        for mode in ("actors", "tasks"):
            config.data.preprocess_compute = mode
            datasets[f"Ray Data ({mode})"] = preprocessed_dataset(str(root / "pq"), config, train=True)

        runs = {"torch DataLoader": lambda: dataloader_batches(rows, args.workers, args.batch_size)}
        runs.update({name: (lambda d=d: d.iter_batches(batch_size=args.batch_size, batch_format="numpy"))
                     for name, d in datasets.items()})
        results: dict[str, list[tuple[float, float]]] = {}
        for _ in range(2):
            for name, make in runs.items():
                results.setdefault(name, []).append(timed_epoch(make()))
        print(f"\npreprocessing throughput, {args.images} images, {args.workers} worker processes each, images/s "
              "(whole epoch / second half of the epoch)")
        base = results["torch DataLoader"]
        for name, rates in results.items():
            cells = "   ".join(f"epoch {e + 1} {whole:6.1f} / {steady:6.1f}" for e, (whole, steady) in enumerate(rates))
            ratios = " ".join(f"{w / bw:.2f}x/{s / bs:.2f}x" for (w, s), (bw, bs) in zip(rates, base))
            print(f"  {name:<20} {cells}   vs DataLoader {ratios}")
        ray.shutdown()


if __name__ == "__main__":
    main()
