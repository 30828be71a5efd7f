"""A training run's checkpoint write: Ray Train's default upload against the direct write the
training loop does.

    python -m benchmarks.checkpoint_write [--config coco_hourglass104] [--repeats 2]

A local Ray; each run is a ``TorchTrainer`` of one worker that builds ``--config``'s model with
Adam's state after a step (the checkpoint a run writes: Hourglass-104's is 2.3 GB), then times
the checkpoint's write and report, in the worker: wall seconds and the worker process's CPU seconds (user +
system; writing to the page cache is system time). ``ray upload``: the state saved to a local
temporary folder and reported with Ray Train's default ``SYNC`` upload, which copies the folder into
the run's storage path (the loop before it wrote its checkpoints itself). ``direct``: the loop's
``_write_checkpoint``, the state written straight into the run's folder and reported with
``NO_UPLOAD``. The two alternate, ``--repeats`` runs each; medians and the ratio are printed.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.timing import cpu_kind


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_one_checkpoint(cfg: dict[str, Any]) -> None:
    """A Ray Train worker: one checkpoint epoch in ``cfg["mode"]``, timed; then the timings reported."""
    import ray.train
    import torch

    from centernet_ray.checkpoint import CHECKPOINT_FILE, RUN_CONFIG_FILE, checkpoint_state, save_checkpoint
    from centernet_ray.config import config_from_dict
    from centernet_ray.model import build_model
    from centernet_ray.ray_train.loop import _write_checkpoint

    config = config_from_dict(cfg["config"])
    model = build_model(config.model, 80)
    optimizer = torch.optim.Adam(model.parameters())
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # Adam's two moments per weight exist from the first step, as in a run's checkpoint
    state = checkpoint_state(model, config, [str(i) for i in range(80)], list(range(1, 81)), 1, optimizer)
    started, cpu = time.perf_counter(), _cpu_seconds()
    if cfg["mode"] == "direct":
        ray.train.report({}, checkpoint=_write_checkpoint(state, config, "epoch_0001"), checkpoint_dir_name="epoch_0001",
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
    else:
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(Path(directory) / CHECKPOINT_FILE, state)
            (Path(directory) / RUN_CONFIG_FILE).write_text(config.to_yaml())
            ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name="epoch_0001")
    timings = {"wall": time.perf_counter() - started, "cpu": _cpu_seconds() - cpu}
    with tempfile.TemporaryDirectory() as directory:  # Ray Train V2 returns the metrics of a checkpoint
        Path(directory, "timings.txt").write_text(repr(timings))
        ray.train.report(timings, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name="timings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="coco_hourglass104")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import shutil

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from centernet_ray.config import load_config

    print(f"CPU kind: {cpu_kind()}")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    config = load_config(args.config, ["model.pretrained=null"])
    modes = ("ray upload", "direct")
    samples: dict[str, dict[str, list[float]]] = {mode: {"wall": [], "cpu": []} for mode in modes}
    size = 0
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes * args.repeats:
            storage = Path(tmp) / "runs"
            trainer = TorchTrainer(
                write_one_checkpoint, train_loop_config={"config": config.to_dict(), "mode": mode.split()[0]},
                scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
                run_config=RunConfig(name=f"checkpoint-{uuid.uuid4().hex[:8]}", storage_path=str(storage)))
            result = trainer.fit()
            size = sum(f.stat().st_size for f in storage.rglob("checkpoint.pt"))
            for key in ("wall", "cpu"):
                samples[mode][key].append(result.metrics[key])
            print(f"  {mode:<10}  {result.metrics['wall']:6.1f} s wall  {result.metrics['cpu']:6.1f} s CPU  "
                  f"({size / 1e9:.2f} GB checkpoint)", flush=True)
            shutil.rmtree(storage)  # each run writes into an empty storage path, as a new run does
    print(f"\n{args.config}: one checkpoint of {size / 1e9:.2f} GB, medians of {args.repeats} runs each")
    base = samples[modes[0]]
    for mode in modes:
        wall, cpu = statistics.median(samples[mode]["wall"]), statistics.median(samples[mode]["cpu"])
        print(f"  {mode:<10}  {wall:6.1f} s wall ({statistics.median(base['wall']) / wall:4.2f}x vs {modes[0]})   "
              f"{cpu:6.1f} s of the worker's CPU ({statistics.median(base['cpu']) / cpu:4.2f}x)")


if __name__ == "__main__":
    main()
