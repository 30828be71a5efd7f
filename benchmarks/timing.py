"""Interleaved timing: candidates alternate run by run so machine noise hits both alike."""

from __future__ import annotations

import statistics
import subprocess
import time
from typing import Callable


def compare(candidates: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each candidate, measured alternately."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def report(title: str, seconds: dict[str, float], baseline: str) -> None:
    print(f"\n{title}")
    for name, value in seconds.items():
        ratio = seconds[baseline] / value
        print(f"  {name:<34} {value * 1e3:10.2f} ms   {ratio:5.2f}x vs {baseline}")


def cpu_kind() -> str:
    """This machine's CPU kind as the figures are reported: ``lscpu`` lists ``avx512_bf16`` or not."""
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return "AVX512-BF16" if "avx512_bf16" in flags else "AVX2 only (no avx512_bf16)"
