"""Focal loss forward+backward on [16, 80, 128, 128]: fused logits formulation vs clamped sigmoid.

    python -m benchmarks.focal_loss [--batch 16] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.timing import compare, report
from centernet_ray.losses import focal_loss


def clamped_sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """The common formulation (official CenterNet): clamp p to [1e-4, 1 - 1e-4], separate terms."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg = target.lt(1).float()
    neg_weights = torch.pow(1 - target, beta)
    pos_loss = (torch.log(p) * torch.pow(1 - p, alpha) * pos).sum()
    neg_loss = (torch.log(1 - p) * torch.pow(p, alpha) * neg_weights * neg).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.classes, args.size, args.size)
    # logits around the head's prior (-2.19) and a sparse Gaussian-like target with some exact 1s
    logits = torch.randn(shape, generator=gen) - 2.19
    target = torch.rand(shape, generator=gen) ** 8
    target[target > 0.97] = 1.0

    def step(fn):
        x = logits.clone().requires_grad_()
        loss = fn(x, target)
        loss.backward()
        return loss.detach(), x.grad

    ours, ours_grad = step(focal_loss)
    base, base_grad = step(clamped_sigmoid_focal)
    print(f"focal loss {list(shape)} ({torch.get_num_threads()} threads)")
    print(f"  value: fused {ours.item():.6f}  clamped {base.item():.6f}  rel diff {abs(ours - base).item() / base.item():.2e}")
    print(f"  max |grad diff| {(ours_grad - base_grad).abs().max().item():.2e} (max |grad| {base_grad.abs().max().item():.2e})")
    seconds = compare({"clamped sigmoid (autograd)": lambda: step(clamped_sigmoid_focal),
                       "fused logits (centernet_ray)": lambda: step(focal_loss)}, repeats=args.repeats, warmup=1)
    report("forward + backward", seconds, baseline="clamped sigmoid (autograd)")


if __name__ == "__main__":
    main()
