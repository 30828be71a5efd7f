"""Which autocast dtype a device should use for the configured ``amp`` setting."""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is
    emulated, and measured 16x slower than fp32 for a ResNet-18 training step (BENCHMARKS.md)."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def autocast_dtype(amp: str, device: torch.device | str) -> torch.dtype | None:
    """``amp`` ("bf16" | "fp16" | "none") -> the dtype to autocast to on ``device``, or None.

    On CUDA the setting is taken as given. On the CPU, fp16 becomes bf16 (CPU fp16 autocast is slow
    and needs a grad scaler), and bf16 falls back to fp32 when the CPU lacks native bf16.
    """
    device = torch.device(device)
    if amp == "none":
        return None
    if device.type == "cuda":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if device.type == "cpu" and not cpu_has_fast_bf16():
        log.info("amp=%s ignored on this CPU: no native bf16 (AVX512-BF16/AMX), training in fp32", amp)
        return None
    return torch.bfloat16
