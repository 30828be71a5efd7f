"""train.compile: the training step with the model through torch.compile vs eager, same batches.

    python -m benchmarks.compile [--config demo] [--steps 20] [--repeats 3] [section.key=value ...]

Both engines are built from the same config and seed (``TrainingEngine``, the step every trainer
runs) and step over the same batch of the config's size with targets rendered as the collate does.
The compiled one's first steps (the compilation) are timed apart; then eager and compiled runs of
``--steps`` steps alternate ``--repeats`` times and the medians are shown. Threads: all cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from centernet_ray.config import load_config
from centernet_ray.targets import OUTPUT_STRIDE, render_targets
from centernet_ray.training.engine import TrainingEngine


def batch_for(config, num_classes: int = 4) -> dict:
    """A batch of the config's batch size and input size: random pixels, two boxes per image."""
    height, width = config.data.input_size
    size, slots = config.train.batch_size, config.targets.max_objects
    generator = torch.Generator().manual_seed(0)
    boxes = torch.zeros(size, slots, 4)
    boxes[:, 0] = torch.tensor([2.0, 3.0, 9.0, 12.0])
    boxes[:, 1] = torch.tensor([10.0, 8.0, 20.0, 25.0])
    classes = torch.zeros(size, slots, dtype=torch.int32)
    classes[:, 1] = 1
    targets = render_targets(boxes, classes, torch.full((size,), 2, dtype=torch.int32), num_classes,
                             (height // OUTPUT_STRIDE, width // OUTPUT_STRIDE), slots)
    return {"image": torch.randint(0, 255, (size, 3, height, width), dtype=torch.uint8, generator=generator),
            "targets": targets}


def images_per_second(engine: TrainingEngine, batch: dict, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        engine.step(batch)
    engine.check_finite()  # reads the device once, as a log interval does
    return steps * len(batch["image"]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    engines, batch = {}, None
    for name, flag in (("eager", "false"), ("torch.compile", "true")):
        config = load_config(args.config, [*args.overrides, f"train.compile={flag}"])
        batch = batch or batch_for(config)
        torch.manual_seed(config.train.seed)
        engines[name] = TrainingEngine(config, num_classes=4, steps_per_epoch=1000)
        start = time.perf_counter()
        for _ in range(3):  # eager: warm-up; compiled: the compilation
            engines[name].step(batch)
        print(f"{name}: first 3 steps {time.perf_counter() - start:.1f} s", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            rates[name].append(images_per_second(engine, batch, args.steps))
    eager = statistics.median(rates["eager"])
    print(f"\n{args.config}: batch {len(batch['image'])}, {tuple(batch['image'].shape[2:])}, amp "
          f"{engines['eager'].amp_dtype or 'fp32'}, {torch.get_num_threads()} threads; median of {args.repeats}")
    for name, values in rates.items():
        print(f"  {name:<14} {statistics.median(values):8.1f} img/s  {statistics.median(values) / eager:5.2f}x vs eager"
              f"   [{'/'.join(f'{v:.1f}' for v in values)}]")


if __name__ == "__main__":
    main()
