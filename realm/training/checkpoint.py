"""Checkpoints of the training core: ``run_dir/checkpoints/step-000100/`` directories.

Each is written to a temporary name and renamed into place with a ``manifest.json``, so a crash
never leaves one that looks complete; the training state accelerate does not save is JSON
(:data:`TRAINING_STATE`), never a pickle. A failed save raises
:class:`realm.errors.CheckpointError` saying what is wrong with the disk
(:func:`realm.fsutil.write_failure`, the words of every failed write).

The manifest records what the run was made from (``origin``: stage, corpus fingerprint, a digest
of the model's parameter shapes); :func:`resume_checkpoint` refuses a checkpoint of another
origin, one whose files would be unpickled by the installed loaders (:data:`SAFE_LOADERS`), and
planted pickles, each with a :class:`realm.errors.ResumeError` in one line.

A checkpoint leaves out the weights the run rebuilds exactly when it is constructed (a frozen
pretrained LM: the modules' ``rebuilt_parameters()``, :func:`rebuilt_keys`); its manifest's
``rebuilt`` records how many and a fingerprint of them, and a resume whose model rebuilds other
weights is refused.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import re
import shutil
from typing import Any, Iterator, Optional, Protocol

from realm.cache import digest
from realm.version import __version__
from realm.errors import CheckpointError, ResumeError
from realm.fsutil import write_failure

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
        raise ResumeError(f"{checkpoint}: no {TRAINING_STATE}; a checkpoint whose training state "
                          "is pickled (an older realm) is not loaded, since unpickling a run "
                          "directory's files can run code. Start the run afresh.")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ResumeError(f"{path}: malformed JSON ({e}); remove this checkpoint to resume from "
                          "the one before, or set train.resume=false") from None
    if not isinstance(saved, dict):
        raise ResumeError(f"{path}: expected an object of states, got {type(saved).__name__}")
    for name, obj in states.items():
        if name not in saved:
            raise ResumeError(f"{path}: no state for {name!r} (saved: {sorted(saved)})")
        try:
            obj.load_state_dict(saved[name])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ResumeError(f"{path}: the state of {name!r} does not load "
                              f"({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------
# Resume: what is refused before anything is loaded

#: The lowest versions whose loaders never unpickle a checkpoint's files: ``torch.load``
#: defaults to ``weights_only`` from torch 2.6, and accelerate reads ``optimizer.bin``,
#: ``sampler.bin`` and ``random_states_*.pkl`` through its own ``weights_only`` loader from 1.1.0.
#: setup.cfg's floors (tests/training/test_resume.py keeps the two equal).
SAFE_LOADERS = {"torch": "2.6", "accelerate": "1.1.0"}


def installed_version(package: str) -> str:
    return importlib.metadata.version(package)


def check_loaders(checkpoint: str) -> None:
    """Refuse to resume when an installed loader could unpickle the checkpoint's files.

    Raises:
        ResumeError: naming each package below :data:`SAFE_LOADERS` and the checkpoint.
    """
    from packaging.version import Version

    old = [f"{name} {installed_version(name)} (needs >= {floor})"
           for name, floor in SAFE_LOADERS.items()
           if Version(installed_version(name)).release < Version(floor).release]
    if old:
        raise ResumeError(f"{checkpoint}: not resumed with {', '.join(old)}: these versions "
                          "unpickle a checkpoint's optimizer and RNG files, and unpickling a run "
                          "directory's files can run code; upgrade them (pip install "
                          + " ".join(f"'{n}>={v}'" for n, v in SAFE_LOADERS.items()) + ")")


def unloadable(checkpoint: str, e: Exception) -> ResumeError:
    """The one-line error of a checkpoint whose files do not load (truncated, planted)."""
    why = (str(e).strip().splitlines() or [""])[0][:300]
    return ResumeError(f"{checkpoint}: cannot be loaded ({type(e).__name__}: {why}); remove it "
                       "to resume from the checkpoint before, or set train.resume=false")


def _bare(key: str) -> str:
    """A state-dict key without DistributedDataParallel's ``module.`` prefix."""
    return key[len("module."):] if key.startswith("module.") else key


def saved_shapes(checkpoint: str) -> dict[str, list[int]]:
    """The tensors' names (without ``module.``) and shapes in the header of the checkpoint's
    ``model.safetensors`` (nothing is loaded); raises what safetensors raises on a bad file."""
    from safetensors import safe_open

    with safe_open(os.path.join(checkpoint, "model.safetensors"), "pt") as f:
        return {_bare(k): list(f.get_slice(k).get_shape()) for k in f.keys()}


def rebuilt_keys(model) -> list[str]:
    """The state-dict keys of ``model`` (unwrapped) that a checkpoint leaves out: the parameters
    its modules name in ``rebuilt_parameters()`` (the frozen weights of a pretrained LM, which
    the run loads again from their own checkpoint when it resumes), under every name a tied
    weight has."""
    fixed = {id(p) for m in model.modules() if hasattr(m, "rebuilt_parameters")
             for p in m.rebuilt_parameters()}
    return sorted(name for name, p in model.named_parameters(remove_duplicate=False)
                  if id(p) in fixed)


def rebuilt_fingerprint(model, keys: list[str]) -> str:
    """A digest of the left-out weights' names, shapes and first values: enough to tell another
    LM of the same architecture (reading all 135M weights would cost seconds a checkpoint)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return digest([[k, list(params[k].shape), params[k].detach().flatten()[:16].float().tolist()]
                   for k in keys])


def check_model_file(checkpoint: str, model, rebuilt: set[str]) -> None:
    """Before a non-strict load (a checkpoint that left ``rebuilt`` out): every other tensor of
    ``model`` is in the checkpoint's ``model.safetensors`` (or tied to one that is) and the file
    holds nothing the model lacks.

    Raises:
        ResumeError: naming the first keys missing or unexpected.
    """
    path = os.path.join(checkpoint, "model.safetensors")
    try:
        saved = set(saved_shapes(checkpoint))
    except Exception as e:  # a truncated file: one line, as accelerate's own load would fail
        raise unloadable(checkpoint, e) from e
    state = model.state_dict(keep_vars=True)
    present = {state[k].data_ptr() for k in saved if k in state}
    missing = [k for k, t in state.items()
               if k not in saved and k not in rebuilt and t.data_ptr() not in present]
    unexpected = sorted(saved - state.keys())
    if missing or unexpected:
        raise ResumeError(f"{path}: does not fit this run's model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); remove it to resume from the "
                          "checkpoint before, or set train.resume=false")


def model_origin(model) -> dict[str, Any]:
    """``{"model_shapes": digest, "model_tensors": n}`` of a model's state dict (names and
    shapes; what a checkpoint of it must match)."""
    shapes = sorted((name, list(t.shape)) for name, t in model.state_dict().items())
    return {"model_shapes": digest(shapes), "model_tensors": len(shapes)}


def check_origin(checkpoint: str, saved: dict[str, Any], origin: dict[str, Any], model) -> None:
    """Refuse a checkpoint made by another stage, from another corpus or for a model of other
    parameter shapes (keys missing on either side are not compared).

    Raises:
        ResumeError: naming what the checkpoint was made from and what this run is.
    """
    def differs(key: str) -> bool:
        return bool(saved.get(key)) and bool(origin.get(key)) and saved[key] != origin[key]

    advice = "use another train.run_dir, or train.resume=false to start this one afresh"
    if differs("stage"):
        raise ResumeError(f"{checkpoint} was made by stage {saved['stage']!r}, this run is "
                          f"{origin['stage']!r}: not resumed; {advice}")
    if differs("corpus_fingerprint"):
        raise ResumeError(
            f"{checkpoint} was made from corpus {saved.get('corpus', '?')} (fingerprint "
            f"{saved['corpus_fingerprint']}), this run reads {origin.get('corpus', '?')} "
            f"(fingerprint {origin['corpus_fingerprint']}): not resumed; {advice}")
    if differs("model_shapes"):
        raise ResumeError(
            f"{checkpoint} holds a model of other parameter shapes ({saved['model_shapes']}, "
            f"{saved.get('model_tensors', '?')} tensors) than this run's "
            f"({origin['model_shapes']}, {origin.get('model_tensors', '?')} tensors)"
            f"{shape_difference(checkpoint, model)}: not resumed; {advice}")


def shape_difference(checkpoint: str, model) -> str:
    """``; first difference: NAME [a] there, [b] here`` from the header of the checkpoint's
    ``model.safetensors`` (nothing is loaded); empty when it cannot tell."""
    try:
        there = saved_shapes(checkpoint)
    except Exception:  # no such file, or a header it cannot read: the digests say enough
        return ""
    here = {name: list(t.shape) for name, t in model.state_dict().items()}
    for name in sorted(set(there) | set(here)):
        if name in there and name in here and there[name] != here[name]:
            return f"; first difference: {name} {there[name]} there, {here[name]} here"
    only = sorted(set(there) ^ set(here))
    if only:
        side = "there" if only[0] in there else "here"
        return f"; first difference: {only[0]} only {side}"
    return ""


@contextlib.contextmanager
def rng_skips() -> Iterator[list[str]]:
    """Collect accelerate's "Could not load random states" (an INFO line it logs when it skips
    a checkpoint's RNG file) during ``load_state``; other records pass as they would."""
    target = logging.getLogger("accelerate.checkpointing")
    level = target.level
    shown = target.getEffectiveLevel()
    seen: list[str] = []

    def watch(record: logging.LogRecord) -> bool:
        if "Could not load random states" in record.getMessage():
            seen.append(record.getMessage())
            return False
        return record.levelno >= shown

    target.addFilter(watch)
    target.setLevel(min(shown, logging.INFO))
    try:
        yield seen
    finally:
        target.removeFilter(watch)
        target.setLevel(level)


def check_rebuilt(checkpoint: str, rebuilt: Optional[dict[str, Any]], model) -> bool:
    """Whether the checkpoint holds every weight (a strict load); when it left some out
    (its manifest's ``rebuilt``), refuse a model that rebuilds other ones and check the rest
    (:func:`check_model_file`).

    Raises:
        ResumeError: the model's rebuilt weights differ from the checkpoint's, or its file does
            not fit the model.
    """
    if not rebuilt:
        return True
    keys = rebuilt_keys(model)
    here = {"tensors": len(keys), "fingerprint": rebuilt_fingerprint(model, keys)}
    there = {k: rebuilt.get(k) for k in here}
    if here != there:
        raise ResumeError(f"{checkpoint}: it left out {there['tensors']} frozen pretrained "
                          f"weights (fingerprint {there['fingerprint']}), which this run "
                          f"rebuilds as {here['tensors']} (fingerprint {here['fingerprint']}): "
                          "the frozen LM is not the one the checkpoint was trained with (see "
                          "its manifest's config); use that LM, another train.run_dir, or "
                          "train.resume=false")
    check_model_file(checkpoint, model, set(keys))
    return False


def resume_checkpoint(accelerator, checkpoint: str, states: dict[str, Any],
                      origin: dict[str, Any], model) -> None:
    """Load ``checkpoint`` into the prepared objects (``accelerator.load_state``) and ``states``
    (:data:`TRAINING_STATE`), after refusing what is unsafe: planted pickles, loaders that would
    unpickle (:func:`check_loaders`), another origin (:func:`check_origin`). An RNG state that
    cannot be read is a warning: the run resumes, but not exactly.

    Raises:
        ResumeError: in one line naming the checkpoint (and both origins where they differ).
    """
    pickles = sorted(f for f in os.listdir(checkpoint) if f.startswith("custom_checkpoint_"))
    if pickles:  # realm writes none: refused, never unpickled
        raise ResumeError(f"{checkpoint}: holds {', '.join(pickles)}, pickles realm never "
                          "writes (an older realm's checkpoint, or planted); not loaded, since "
                          "unpickling can run code. Remove them or start the run afresh.")
    check_loaders(checkpoint)
    path = os.path.join(checkpoint, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        saved = manifest.get("origin") or {}
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise ResumeError(f"{path}: malformed ({e}); remove this checkpoint to resume from the "
                          "one before, or set train.resume=false") from None
    check_origin(checkpoint, saved, origin, model)
    strict = check_rebuilt(checkpoint, manifest.get("rebuilt"), model)
    with rng_skips() as skipped:
        try:
            accelerator.load_state(checkpoint, strict=strict)
        except Exception as e:  # a truncated or planted file: one line, --debug has the rest
            raise unloadable(checkpoint, e) from e
    if skipped:
        logger.warning("%s: random_states_%d.pkl could not be read (accelerate skipped it): the "
                       "run resumes, but not exactly (dropout and masking draw other numbers "
                       "than the uninterrupted run)", checkpoint, accelerator.process_index)
    load_training_state(checkpoint, states)


def save_checkpoint(accelerator, s: CheckpointSettings, step: int, config_dict: Optional[dict],
                    states: dict[str, Any], origin: Optional[dict[str, Any]] = None,
                    model=None) -> str:
    """``accelerator.save_state`` into ``checkpoints/step-S`` atomically, with the training state
    as JSON (:data:`TRAINING_STATE`) and ``origin`` in the manifest; keep the newest K. ``model``
    (unwrapped): its :func:`rebuilt_keys` are left out, the manifest's ``rebuilt`` says so."""
    root = os.path.join(s.run_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:06d}")
    tmp = os.path.join(root, f".tmp-step-{step:06d}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        _write_checkpoint(accelerator, s, step, config_dict, states, tmp, final, origin or {},
                          model)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as "iostream error"
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving checkpoint step {step} into {tmp} failed: "
                              f"{write_failure(root, e)}; the temp directory was removed and "
                              f"the newest complete checkpoint is kept") from e
    return final


def _write_checkpoint(accelerator, s: CheckpointSettings, step: int, config_dict: Optional[dict],
                      states: dict[str, Any], tmp: str, final: str,
                      origin: dict[str, Any], model=None) -> None:
    keys = rebuilt_keys(model) if model is not None else []
    left_out = set(keys)

    def leave_out(models, weights, output_dir) -> None:  # (accelerate's save_state pre-hook)
        for weight in weights:
            for key in [k for k in weight if _bare(k) in left_out]:
                del weight[key]

    hook = accelerator.register_save_state_pre_hook(leave_out)
    try:
        accelerator.save_state(tmp)
    finally:
        hook.remove()
    training_state = {name: obj.state_dict() for name, obj in states.items()}  # (every rank)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, TRAINING_STATE), "w", encoding="utf-8") as f:
            json.dump(training_state, f)
            f.flush()
            os.fsync(f.fileno())
        manifest = {
            "kind": "checkpoint", "step": step, "realm_version": __version__,
            "num_processes": accelerator.num_processes, "origin": origin,
            "rebuilt": ({"tensors": len(keys), "fingerprint": rebuilt_fingerprint(model, keys)}
                        if keys else None),
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
