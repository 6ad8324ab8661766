"""Checkpoints of the training core: ``run_dir/checkpoints/step-000100/`` directories.

Each is written to a temporary name and renamed into place with a ``manifest.json``, so a crash
never leaves one that looks complete; the training state accelerate does not save is JSON
(:data:`TRAINING_STATE`), never a pickle. A failed save raises
:class:`realm.errors.CheckpointError` saying what is wrong with the disk (:func:`disk_problem`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import shutil
from typing import Any, Optional, Protocol

from realm.version import __version__
from realm.errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")


class CheckpointSettings(Protocol):
    """What saving a checkpoint reads of :class:`realm.training.core.TrainSettings`."""

    run_dir: str
    keep_checkpoints: int


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run, oldest first: ``(step, path)``."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = CHECKPOINT_PATTERN.match(name)
        if m and os.path.isfile(os.path.join(root, name, "manifest.json")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


#: The JSON file of a checkpoint holding the training state accelerate does not save (the
#: scheduler, the data position, hook state such as the pinned index generation).
TRAINING_STATE = "training_state.json"


def load_training_state(checkpoint: str, states: dict[str, Any]) -> None:
    """Load :data:`TRAINING_STATE` of ``checkpoint`` into ``states``' objects (JSON only).

    Raises:
        ValueError: the checkpoint has no such file (one from an older realm keeps this state
            as pickles, which are never loaded), or it lacks an entry.
    """
    path = os.path.join(checkpoint, TRAINING_STATE)
    if not os.path.isfile(path):
        raise ValueError(f"{checkpoint}: no {TRAINING_STATE}; a checkpoint whose training state "
                         "is pickled (an older realm) is not loaded, since unpickling a run "
                         "directory's files can run code. Start the run afresh.")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    for name, obj in states.items():
        if name not in saved:
            raise ValueError(f"{path}: no state for {name!r} (saved: {sorted(saved)})")
        obj.load_state_dict(saved[name])


def save_checkpoint(accelerator, s: CheckpointSettings, step: int, config_dict: Optional[dict],
                    states: dict[str, Any]) -> str:
    """``accelerator.save_state`` into ``checkpoints/step-S`` atomically, with the training state
    as JSON (:data:`TRAINING_STATE`); keep the newest K."""
    root = os.path.join(s.run_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:06d}")
    tmp = os.path.join(root, f".tmp-step-{step:06d}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        _write_checkpoint(accelerator, s, step, config_dict, states, tmp, final)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as "iostream error"
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving checkpoint step {step} into {tmp} failed: "
                              f"{disk_problem(root) or e}; the temp directory was removed and "
                              f"the newest complete checkpoint is kept") from e
    return final


def disk_problem(path: str, low_bytes: int = 64 << 20) -> Optional[str]:
    """Why files cannot be written under ``path`` ("no space left on the device" with what is
    free, not writable, or what a 1 MiB probe write fails with), else None."""
    try:
        usage = shutil.disk_usage(path)
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    if usage.free < low_bytes:
        return f"no space left on the device ({usage.free >> 20} MiB free under {path})"
    if not os.access(path, os.W_OK):
        return f"permission denied: {path} is not writable"
    probe = os.path.join(path, f".write-probe-{os.getpid()}")
    try:  # torch says only "iostream error": what a plain write of 1 MiB says is clearer
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"{e.strerror or e} writing under {path}"
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    return None


def _write_checkpoint(accelerator, s: CheckpointSettings, step: int, config_dict: Optional[dict],
                      states: dict[str, Any], tmp: str, final: str) -> None:
    accelerator.save_state(tmp)
    training_state = {name: obj.state_dict() for name, obj in states.items()}  # (every rank)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, TRAINING_STATE), "w", encoding="utf-8") as f:
            json.dump(training_state, f)
            f.flush()
            os.fsync(f.fileno())
        manifest = {
            "kind": "checkpoint", "step": step, "realm_version": __version__,
            "num_processes": accelerator.num_processes,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": config_dict,
        }
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        for _, old in checkpoints(s.run_dir)[:-max(1, s.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
