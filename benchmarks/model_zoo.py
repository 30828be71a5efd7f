"""Parameters, FLOPs and CPU forward latency of every model family at 512x512, beside the official
implementation's parameter counts.

    python -m benchmarks.model_zoo [--threads 2] [--repeats 5] [--size 512]

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add) plus the
deformable convolutions, which it does not know: each is counted as its dense equivalent (2 x
C_in x C_out x k^2 per output pixel) and the bilinear sampling of its k^2 taps is left out. Latency:
one image, eval mode, fp32, after warm-up, median of ``--repeats`` runs; the ratio column is against
ResNet-18 measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import DeformConv2d

from centernet_ray.config import load_config
from centernet_ray.model import build_model

NUM_CLASSES = 80  # COCO, as in the official counts
# name -> (config overrides, the official implementation's parameter count in millions (as cited;
# None where none is cited), which official model)
MODELS = {
    "resnet18": (["model.backbone=resnet18", "model.head_conv=64"], None, "no official ctdet model"),
    "resdcn18": (["model.backbone=resdcn18", "model.head_conv=64"], None, "ctdet_coco_resdcn18"),
    "dla34": (["model.backbone=dla34", "model.deformable=true", "model.head_conv=256"], 20.0,
              "ctdet_coco_dla_2x: about 20M"),
    "dla34 (plain convs)": (["model.backbone=dla34", "model.deformable=false", "model.head_conv=256"], None,
                            "fallback without DCN"),
    "hourglass104": (["model.backbone=hourglass104", "model.head_conv=256"], 190.0, "ctdet_coco_hg: about 190M"),
}


def deform_conv_flops(model: torch.nn.Module, size: int) -> int:
    """Dense-equivalent FLOPs of the model's DeformConv2d layers for one [size x size] image, from
    the output resolution each one sees (found with forward hooks)."""
    total = 0

    def count(module: DeformConv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        total += 2 * module.in_channels // module.groups * module.out_channels * k * output.shape[-2] * output.shape[-1]

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, DeformConv2d)]
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return total


def measure(model: torch.nn.Module, size: int, repeats: int) -> tuple[float, float]:
    """(GFLOPs, median seconds) of one forward pass on a 1 x 3 x size x size image."""
    image = torch.randn(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(image)
    flops = counter.get_total_flops() + deform_conv_flops(model, size)
    times = []
    with torch.inference_mode():
        model(image)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(image)
            times.append(time.perf_counter() - start)
    return flops / 1e9, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--only", nargs="*", help="a subset of: " + ", ".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for name, (overrides, official, source) in MODELS.items():
        if args.only and name not in args.only:
            continue
        config = load_config(None, [*overrides, f"data.input_size=[{args.size},{args.size}]"])
        model = build_model(config.model, NUM_CLASSES).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gflops, seconds = measure(model, args.size, args.repeats)
        rows.append((name, params, official, source, gflops, seconds))
        print(f"measured {name}: {params:.2f}M params, {gflops:.1f} GFLOPs, {seconds * 1e3:.0f} ms", flush=True)

    baseline = next((r[5] for r in rows if r[0] == "resnet18"), None)
    print(f"\n{NUM_CLASSES} classes, {args.size}x{args.size}, batch 1, fp32, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'model':22} {'params (M)':>10} {'official (M)':>12} {'diff':>7} {'GFLOPs':>8} {'CPU ms':>8} {'vs resnet18':>11}")
    for name, params, official, source, gflops, seconds in rows:
        diff = f"{100 * (params - official) / official:+.1f}%" if official else "-"
        ratio = f"{seconds / baseline:.2f}x" if baseline else "-"
        print(f"{name:22} {params:10.2f} {official if official else '-':>12} {diff:>7} {gflops:8.1f} "
              f"{seconds * 1e3:8.0f} {ratio:>11}   ({source})")


if __name__ == "__main__":
    main()
