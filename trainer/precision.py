"""Numeric precision: what `--precision auto` means on this hardware, and the autocast context for it."""

from __future__ import annotations

import contextlib
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    if platform.system() == "Linux" and Path("/proc/cpuinfo").exists():
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return platform.machine() == "arm64" and torch.backends.mps.is_available()  # Apple M2+ has bf16


def resolve_precision(requested: str, device: torch.device) -> str:
    """Map --precision auto to what the hardware does well; refuse or warn on poor explicit choices."""
    if requested not in PRECISIONS:
        raise ValueError(f"--precision {requested!r} is not one of: {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        if requested == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return requested
    if requested == "fp16":
        raise ValueError("--precision fp16 is for CUDA; on CPU use bf16 (if natively supported) or fp32")
    native = cpu_has_native_bf16()
    if requested == "auto":
        if not native:
            log.info("CPU lacks native bf16 (AVX512-BF16/AMX): training in fp32")
        return "bf16" if native else "fp32"
    if requested == "bf16" and not native:
        log.warning("--precision bf16 on a CPU without native bf16 is emulated and much slower than fp32")
    return requested


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast for bf16/fp16 (BatchNorm and losses stay fp32); nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
