"""The one accelerator factory every training stage uses, and its clean shutdown.

The factory also takes the run directory's trainer lock (``train.run_dir/.trainer.lock``, held
by the main process until :func:`shutdown` or its death): one trainer per run directory.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from datetime import timedelta
from typing import Optional

import torch

from realm.errors import RunDirError, StoreLockedError
from realm.fsutil import FileLock
from realm.precision import training_precision

logger = logging.getLogger(__name__)

#: The trainer lock of a run directory (an ``flock``; the file names the holder).
TRAINER_LOCK = ".trainer.lock"

#: Locks held by this process: ``id(accelerator) -> (run_dir, lock)`` (released by shutdown).
HELD: dict[int, tuple[str, FileLock]] = {}


def make_accelerator(train, seed: int):
    """An ``Accelerator`` for the ``train`` section (``precision``, ``grad_accum``,
    ``collective_timeout_s``): CPU where no CUDA device is, mixed precision as
    :func:`realm.precision.training_precision` chooses; seeds every generator with ``seed``.

    Returns:
        ``(accelerator, precision)``: precision is ``"bf16"``, ``"fp16"`` or None (fp32).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    use_cpu = not torch.cuda.is_available()
    precision: Optional[str] = training_precision(
        train.precision, torch.device("cpu" if use_cpu else "cuda"))
    handlers = ([InitProcessGroupKwargs(timeout=timedelta(seconds=train.collective_timeout_s))]
                if train.collective_timeout_s > 0 else [])
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        # a stage of this process that failed before shutdown() left accelerate's singletons
        # set; a new stage may choose other settings (nothing distributed is running)
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision or "no",
                              gradient_accumulation_steps=train.grad_accum,
                              kwargs_handlers=handlers)
    set_seed(seed)
    try:
        lock = lock_run_dir(accelerator, train.run_dir)
    except BaseException:
        shutdown(accelerator)  # refused: leave no state behind for the next stage
        raise
    if lock is not None:
        HELD[id(accelerator)] = (os.path.realpath(train.run_dir), lock)
    return accelerator, precision


def lock_run_dir(accelerator, run_dir: str) -> Optional[FileLock]:
    """Take ``run_dir``'s trainer lock on the main process (returned; None elsewhere).

    Every process learns the outcome (a broadcast), so that all of them stop together when the
    main one is refused; none waits for a main process that has gone.

    Raises:
        StoreLockedError: Another live trainer holds the run directory (its pid and host named).
        RunDirError: The run directory cannot be written.
    """
    lock, refused = None, None
    if accelerator.is_main_process:
        path = os.path.realpath(run_dir)
        for key, (held_dir, held) in list(HELD.items()):
            if held_dir == path:  # an earlier stage of this process that never shut down
                held.release()
                del HELD[key]
        lock = FileLock(os.path.join(run_dir, TRAINER_LOCK), "another trainer")
        try:
            lock.acquire(argv=" ".join(sys.argv))
        except StoreLockedError as e:
            lock, refused = None, ("locked", f"{e}: one trainer per train.run_dir (wait for it "
                                             "to finish, or choose another train.run_dir)")
        except OSError as e:
            lock, refused = None, ("unwritable", f"train.run_dir={run_dir}: cannot write "
                                                 f"{TRAINER_LOCK} there: {e.strerror or e}")
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refused = broadcast_object_list([refused])[0]
    if refused is not None:
        kind, message = refused
        raise (StoreLockedError if kind == "locked" else RunDirError)(message)
    if lock is not None:
        logger.info("holding %s", lock.path)
    return lock


def shutdown(accelerator) -> None:
    """Leave no live references or process group behind (avoids aborts at interpreter exit),
    and release the run directory's trainer lock."""
    _, lock = HELD.pop(id(accelerator), (None, None))
    if lock is not None:
        lock.release()
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # accelerate keeps its state in process-wide singletons; forget it so that a later stage in
    # the same process (a notebook, a test, pretraining after ICT) may choose other settings.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
