"""The one accelerator factory every training stage uses, and its clean shutdown."""

from __future__ import annotations

import gc
from typing import Optional

import torch

from realm.precision import training_precision


def make_accelerator(train, seed: int):
    """An ``Accelerator`` for the ``train`` section (``precision``, ``grad_accum``): CPU where
    no CUDA device is, mixed precision as :func:`realm.precision.training_precision` chooses;
    seeds every generator with ``seed``.

    Returns:
        ``(accelerator, precision)``: precision is ``"bf16"``, ``"fp16"`` or None (fp32).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    use_cpu = not torch.cuda.is_available()
    precision: Optional[str] = training_precision(
        train.precision, torch.device("cpu" if use_cpu else "cuda"))
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision or "no",
                              gradient_accumulation_steps=train.grad_accum)
    set_seed(seed)
    return accelerator, precision


def shutdown(accelerator) -> None:
    """Leave no live references or process group behind (avoids aborts at interpreter exit)."""
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # accelerate keeps its state in process-wide singletons; forget it so that a later stage in
    # the same process (a notebook, a test, pretraining after ICT) may choose other settings.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
