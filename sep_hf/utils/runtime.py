"""Device facts the rest of the package asks about: where bf16 autocast pays off."""

from __future__ import annotations

import os
from contextlib import nullcontext
from functools import cache

import torch

__all__ = ["fast_bf16", "autocast", "resolve_mixed_precision", "bf16_allowed", "BF16_ENV"]


BF16_ENV = "SEP_HF_BF16"  # "0" disables bf16 everywhere: the fp32 path of a CPU without AMX / AVX512-BF16


def bf16_allowed() -> bool:
    """False when ``SEP_HF_BF16=0`` (the fp32 path, standing in for a CPU without fast bf16)."""
    return os.environ.get(BF16_ENV, "1").strip().lower() not in ("0", "false", "no")


@cache
def _cpu_has_fast_bf16() -> bool:
    if not bf16_allowed():
        return False
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch: no probe, assume no native bf16
        return False


def fast_bf16(device: torch.device | str) -> bool:
    """True on CUDA devices with bf16 and on CPUs with AMX or AVX512-BF16 (2-3x faster convs)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bf16_allowed() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_fast_bf16()


def autocast(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on ``device`` where it runs fast (``fast_bf16``), else a no-op context."""
    device = torch.device(device)
    if enabled and fast_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def resolve_mixed_precision(value: str | None, use_cpu: bool) -> str | None:
    """'auto' -> 'bf16' where it is fast on the device accelerate will pick, else 'no'."""
    if value != "auto":
        return value
    if use_cpu or not torch.cuda.is_available():
        return "bf16" if _cpu_has_fast_bf16() else "no"
    return "bf16" if bf16_allowed() and torch.cuda.is_bf16_supported() else "fp16"
