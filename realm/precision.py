"""The one precision chooser: trainer, refresher and evaluator all ask here.

``auto`` means bf16 where the device runs it fast (a CUDA GPU with bf16, or a CPU with native
bf16 instructions: AVX-512 BF16 or AMX), else fp32. A CPU that would emulate bf16 runs it slower
than fp32, so ``auto`` gives it fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch

from realm.errors import ConfigError


def cpu_threads(requested: int = 0) -> int:
    """CPU threads for one training process: ``requested``, or with 0 the cores this process
    may run on divided among the processes launched on this machine (``LOCAL_WORLD_SIZE``)."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1)))


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16`` in
    /proc/cpuinfo); where cpuinfo cannot be read, whether oneDNN says it supports bf16."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_is_fast(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 faster than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def autocast_dtype(precision: str, device: torch.device) -> Optional[str]:
    """``"bf16"`` when asked for or (``auto``) when the device runs bf16 fast, else ``None``
    (fp32; also for ``fp16``, which only training stages run: :func:`training_precision`)."""
    if precision in ("fp32", "fp16"):
        return None
    if precision == "bf16":
        return "bf16"
    return "bf16" if bf16_is_fast(device) else None


def training_precision(precision: str, device: torch.device) -> Optional[str]:
    """The mixed precision a training stage gives its ``Accelerator``: ``train.precision``, or
    for ``auto`` the one ``accelerate launch --mixed_precision bf16|fp16`` asked for
    (``ACCELERATE_MIXED_PRECISION``; ``no`` leaves the choice to ``auto``), else bf16 where the
    device runs it fast. fp16 (with loss scaling, by accelerate) needs a CUDA device."""
    if precision == "auto":
        asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        precision = asked if asked in ("bf16", "fp16") else "auto"
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision: fp16 (or accelerate's --mixed_precision fp16) "
                              "needs a CUDA device; on the CPU use bf16 or fp32")
        return "fp16"
    return autocast_dtype(precision, device)


def autocast(bf16: bool, device: torch.device):
    """A bf16 autocast context on ``device`` when ``bf16``, else no change (a null context)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
