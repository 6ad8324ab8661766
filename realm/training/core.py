"""One accelerate training core, shared by ICT, REALM pretraining and Open-QA fine-tuning.

A stage supplies a :class:`Task` (its dataset, collate, loss and evaluation); the core owns the
rest: AdamW with linear warmup/decay, gradient accumulation, bf16 autocast where the device has
it, clipping, periodic logging/evaluation/checkpoints, and exact resume (model, optimizer,
scheduler, RNG and data position) through ``accelerator.save_state``/``load_state``.

Checkpoints (``run_dir/checkpoints/step-000100/``, written atomically) are
:mod:`realm.training.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from realm.tracking import Tracker
from realm.precision import cpu_threads
from realm.training.interrupts import InterruptHold
from realm.training.checkpoint import (checkpoints, model_origin, resume_checkpoint,
                                      save_checkpoint)

logger = logging.getLogger(__name__)


class Task(Protocol):
    """What a training stage provides to :func:`train`."""

    def train_dataset(self) -> torch.utils.data.Dataset: ...

    def collate(self, examples: list) -> Any: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch (scalar tensor) and metrics to log."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Evaluation metrics; called on every process (gather inside if needed)."""

    #: Optional: ``prefetch(model, batch)`` is called with the next batch after each step's
    #: ``before_step`` hooks and before its loss, so that work for it can overlap the step (the
    #: core then reads one batch ahead); absent or None: nothing is read ahead.
    prefetch: Optional[Callable[[torch.nn.Module, Any], None]]


@dataclasses.dataclass
class TrainSettings:
    """The core's knobs (built from the config's ``train`` section by the entry script)."""

    run_dir: str
    steps: int
    batch_size: int
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    num_workers: int = 0
    threads: int = 0  # CPU threads per process; 0: cpu_threads()
    resume: bool = True
    seed: int = 0
    progress: bool = True
    lr_scales: Optional[dict[str, float]] = None  # parameter-name prefix -> learning-rate factor
    lr_holds: Optional[dict[str, int]] = None  # parameter-name prefix -> steps with learning rate 0
    betas: Optional[dict[str, tuple[float, float]]] = None  # parameter-name prefix -> AdamW betas

    @classmethod
    def from_config(cls, config, progress: bool = True, **overrides: Any) -> "TrainSettings":
        """The settings of a :class:`realm.config.Config` (its ``train`` and ``logging``
        sections and seed); ``overrides`` replace single fields (e.g. ``eval_every=0``)."""
        t = config.train
        fields = dict(
            run_dir=t.run_dir, steps=t.steps, batch_size=t.batch_size, grad_accum=t.grad_accum,
            lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
            max_grad_norm=t.max_grad_norm, log_every=config.logging.log_every,
            eval_every=t.eval_every, save_every=t.save_every,
            keep_checkpoints=t.keep_checkpoints, num_workers=t.num_workers, threads=t.threads,
            resume=t.resume,
            seed=config.seed, progress=progress)
        fields.update(overrides)
        return cls(**fields)


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch: the same (seed, epoch) always gives the same order."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng((self.seed, self.epoch)).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


@dataclasses.dataclass
class _Progress:
    """Where training is; saved with each checkpoint (accelerate's custom-object protocol)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (on each rank)

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def _param_groups(model: torch.nn.Module, weight_decay: float, lr: float,
                  lr_scales: Optional[dict[str, float]] = None,
                  lr_holds: Optional[dict[str, int]] = None,
                  betas: Optional[dict[str, tuple[float, float]]] = None) -> list[dict]:
    """AdamW groups: decay / no decay, and per-part learning rates (and betas, where given) by
    parameter-name prefix.

    Each group records ``hold``: optimizer steps during which its learning rate is 0 (a part that
    waits, e.g. the retriever while the reader learns to use what it retrieves).
    """
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((v for k, v in (lr_scales or {}).items() if name.startswith(k)), 1.0)
        hold = next((v for k, v in (lr_holds or {}).items() if name.startswith(k)), 0)
        beta = next((tuple(v) for k, v in (betas or {}).items() if name.startswith(k)), None)
        no_decay = p.ndim < 2 or "LayerNorm" in name or name.endswith("bias")
        groups.setdefault((scale, hold, no_decay, beta or ()), []).append(p)
    return [{"params": params, "lr": lr * scale, "hold": hold,
             "weight_decay": 0.0 if no_decay else weight_decay, **({"betas": beta} if beta else {})}
            for (scale, hold, no_decay, beta), params in sorted(groups.items())]


def _fused_adamw_ok(model: torch.nn.Module) -> bool:
    """Fused AdamW needs floating-point parameters on one device type that has the kernel."""
    params = [p for p in model.parameters() if p.requires_grad]
    types = {p.device.type for p in params}
    return (len(types) == 1 and types <= {"cpu", "cuda"} and all(p.is_floating_point()
                                                                  for p in params))


def _lr_lambda(warmup: int, total: int, hold: int = 0) -> Callable[[int], float]:
    """Linear warmup then linear decay to 0; 0 for the first ``hold`` steps, then the same
    warmup and decay over the remaining ``total - hold`` steps."""
    def f(step: int) -> float:
        if step < hold:
            return 0.0
        step -= hold
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - hold - step) / max(1, total - hold - warmup))
    return f


def _with_next(loader, enabled: bool):
    """``(batch, next batch or None)`` pairs; without ``enabled``, next is always None and
    nothing is read ahead of its step."""
    if not enabled:
        for batch in loader:
            yield batch, None
        return
    it = iter(loader)
    current = next(it, _END)
    while current is not _END:
        upcoming = next(it, _END)
        yield current, (None if upcoming is _END else upcoming)
        current = upcoming


_END = object()


def train(
    model: torch.nn.Module,
    task: Task,
    settings: TrainSettings,
    accelerator,  # accelerate.Accelerator
    tracker: Tracker,
    hooks: Sequence[Any] = (),
    config_dict: Optional[dict] = None,
    origin: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Train ``model`` on ``task`` for ``settings.steps`` optimizer steps (resuming if possible).

    Hooks are objects with any of ``before_step(step)``, ``after_step(step, model)``,
    ``metrics(step) -> dict`` (merged into each logged record), ``state_dict()/load_state_dict()``
    (saved in checkpoints), called on every process. ``origin`` (``stage``,
    ``corpus_fingerprint``, ``corpus``) goes into each checkpoint's manifest with a digest of the
    model's parameter shapes; a checkpoint of another origin is not resumed
    (:func:`realm.training.checkpoint.resume_checkpoint`).

    Returns:
        ``{"steps", "final_loss", "resumed_from", "seconds", "examples_per_s", "last_eval",
        "checkpoint"}``.
    """
    s = settings
    t_start = time.perf_counter()
    if accelerator.device.type == "cpu":
        threads = cpu_threads(s.threads)
        if threads != torch.get_num_threads():
            logger.info("training on %d CPU threads (train.threads; %d before)", threads,
                        torch.get_num_threads())
            torch.set_num_threads(threads)
    # fused AdamW: one kernel over all parameters (7x faster than the per-tensor loop on a CPU,
    # where three 30k x 384 word-embedding tables are updated every REALM step)
    groups = _param_groups(model, s.weight_decay, s.lr, s.lr_scales, s.lr_holds, s.betas)
    for group in groups:
        if 0 < s.steps <= group["hold"]:
            logger.warning("a parameter group is held for %d of %d steps: it never trains",
                           group["hold"], s.steps)
    optimizer = torch.optim.AdamW(groups, lr=s.lr, fused=_fused_adamw_ok(model))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [_lr_lambda(s.warmup_steps, s.steps, g["hold"]) for g in groups])
    dataset = task.train_dataset()
    sampler = EpochSampler(len(dataset), s.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=s.batch_size, sampler=sampler, collate_fn=task.collate,
        drop_last=True, num_workers=s.num_workers,
        # its own generator: creating an iterator must not draw from the global RNG (dropout),
        # or a resumed run would diverge from an uninterrupted one
        generator=torch.Generator().manual_seed(s.seed),
    )
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it
    # once per process), and checkpointed as a registered object.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if len(loader) == 0:
        raise ValueError(f"train.batch_size={s.batch_size} x {accelerator.num_processes} processes "
                         f"is larger than the training set ({len(dataset)} examples)")
    progress = _Progress()
    # the rest of the training state is JSON in the checkpoint, never a pickle: a run directory
    # cannot make a resume execute code (accelerate unpickles its registered custom objects)
    states: dict[str, Any] = {"scheduler": scheduler, "progress": progress}
    states.update({f"hook-{i}-{type(h).__name__}": h for i, h in enumerate(hooks)
                   if hasattr(h, "state_dict")})

    resumed_from = None
    found = checkpoints(s.run_dir) if s.resume else []
    bare = accelerator.unwrap_model(model)  # (checkpoints leave out its rebuilt weights)
    origin = {**(origin or {}), **model_origin(bare)}
    if found:
        resumed_from = found[-1][1]
        resume_checkpoint(accelerator, resumed_from, states, origin, bare)
        logger.info("resumed from %s (step %d)", resumed_from, progress.step)
    # a run killed after its checkpoint (or before its first one) logged later steps that are
    # about to run again: they go (on a fresh start, every record of the earlier run)
    dropped = tracker.truncate_after(progress.step)
    if dropped and not found:
        logger.warning("%s/metrics.jsonl held %d records of an earlier run that left no "
                       "checkpoint%s: removed (this run starts at step 0)", s.run_dir, dropped,
                       "" if s.resume else " to resume (train.resume=false)")

    micro_per_epoch = len(loader)
    total_micro = s.steps * s.grad_accum
    losses: list[float] = []
    window: dict[str, list[float]] = {}
    examples_seen = 0
    last_eval: dict[str, float] = {}
    last_ckpt = resumed_from
    bar = tqdm(total=s.steps, initial=progress.step, desc="train", unit="step",
               disable=not (s.progress and accelerator.is_main_process), mininterval=1.0)
    t_loop = time.perf_counter()
    prefetch = getattr(task, "prefetch", None)  # prefetch(model, next_batch), or None
    model.train()
    micro_in_step = 0
    # the optimizer's update and the step count change together (an interrupt between them would
    # checkpoint one step's weights under the other's number)
    held = InterruptHold()
    logged = [progress.step]  # the newest step whose record is written

    def log_step() -> None:
        elapsed = time.perf_counter() - t_loop
        record = {"loss": float(np.mean(losses[-s.log_every * s.grad_accum:])),
                  "lr": max(scheduler.get_last_lr()),  # the largest: parts may be scaled or held
                  "examples_per_s": examples_seen / max(elapsed, 1e-9)}
        record.update({k: float(np.mean(v)) for k, v in window.items()})
        for hook in hooks:
            if hasattr(hook, "metrics"):
                record.update(hook.metrics(progress.step))
        window.clear()
        tracker.log(record, step=progress.step)
        logged[0] = progress.step
        bar.set_postfix(loss=f"{record['loss']:.4f}")

    try:
        while progress.step < s.steps:
            epoch_loader = loader
            if progress.batch_in_epoch:  # resuming inside an epoch: same order, minus what was seen
                epoch_loader = accelerator.skip_first_batches(loader, progress.batch_in_epoch)
            epoch_loader.set_epoch(progress.epoch)  # accelerate would otherwise use its own count
            sampler.set_epoch(progress.epoch)  # (a skipping loader may not pass it down)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(progress.epoch)
            for batch, upcoming in _with_next(epoch_loader, enabled=prefetch is not None):
                progress.batch_in_epoch += 1
                if micro_in_step == 0:
                    for hook in hooks:
                        if hasattr(hook, "before_step"):
                            hook.before_step(progress.step)
                if upcoming is not None:  # its work overlaps this step (after the swap above)
                    prefetch(model, upcoming)
                micro_in_step += 1
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss, metrics = task.loss(model, batch)
                    if not torch.isfinite(loss.detach()).all():  # never step on it, never save it
                        raise FloatingPointError(
                            f"non-finite loss ({float(loss.detach())}) at step {progress.step + 1}"
                            f" of {s.steps}; stopped without saving anything new (the newest "
                            f"checkpoint in {s.run_dir} is from before it). Lower train.lr or "
                            "check the data.")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and s.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                    if accelerator.sync_gradients:
                        held.hold()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                for k, v in metrics.items():
                    window.setdefault(k, []).append(float(v))
                examples_seen += s.batch_size * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                micro_in_step = 0
                progress.step += 1
                held.release()  # an interrupt noted meanwhile acts here, on a whole step
                bar.update(1)
                for hook in hooks:
                    if hasattr(hook, "after_step"):
                        hook.after_step(progress.step, model)
                if progress.step % s.log_every == 0 or progress.step == s.steps:
                    log_step()
                if s.eval_every and progress.step % s.eval_every == 0:
                    last_eval = _evaluate(task, model, tracker, progress.step)
                if s.save_every and progress.step % s.save_every == 0 and progress.step < s.steps:
                    last_ckpt = save_checkpoint(accelerator, s, progress.step, config_dict,
                                                states, origin, bare)
                if progress.step >= s.steps:
                    break
            else:
                progress.epoch += 1
                progress.batch_in_epoch = 0
                continue
            break
    except KeyboardInterrupt:
        held.release(deliver=False)
        due = progress.step % s.log_every == 0 or progress.step == s.steps
        if due and logged[0] < progress.step and losses:  # stopped between its update and record
            try:  # (the resumed run starts after this step: its record is written now)
                log_step()
            except Exception as err:  # noqa: BLE001 - the checkpoint matters more
                logger.warning("step %d's record not written: %s", progress.step, err)
        bar.close()
        _save_on_interrupt(accelerator, s, progress, micro_in_step, last_ckpt, config_dict,
                           states, origin, bare)
        raise
    finally:
        held.release(deliver=False)
    bar.close()
    if s.eval_every:
        if not last_eval or s.steps % s.eval_every:
            last_eval = _evaluate(task, model, tracker, progress.step)
    last_ckpt = save_checkpoint(accelerator, s, progress.step, config_dict, states, origin, bare)
    elapsed = time.perf_counter() - t_loop
    return {
        "steps": progress.step,
        "final_loss": float(np.mean(losses[-s.grad_accum * max(1, min(s.log_every, 10)):]))
        if losses else math.nan,
        "resumed_from": resumed_from,
        "seconds": round(time.perf_counter() - t_start, 2),
        "examples_per_s": round(examples_seen / max(elapsed, 1e-9), 2),
        "last_eval": last_eval,
        "checkpoint": last_ckpt,
        "micro_batches_per_epoch": micro_per_epoch,
        "total_micro_batches": total_micro,
    }


def _save_on_interrupt(accelerator, s: TrainSettings, progress: _Progress, micro_in_step: int,
                       last_ckpt: Optional[str], config_dict: Optional[dict],
                       states: dict[str, Any], origin: dict[str, Any], model) -> None:
    """Ctrl-C: checkpoint the last completed step, so re-running the command resumes there.

    The micro-batches of an unfinished step are handed back to the data position (their partial
    gradients are not saved). With several processes the ranks may stop at different points and
    a collective save could hang, so only a single process saves; the periodic checkpoints remain.
    """
    if accelerator.num_processes != 1 or progress.step == 0:
        return
    if last_ckpt and last_ckpt.endswith(f"step-{progress.step:06d}"):
        return
    progress.batch_in_epoch = max(0, progress.batch_in_epoch - micro_in_step)
    path = save_checkpoint(accelerator, s, progress.step, config_dict, states, origin, model)
    logger.warning("interrupted at step %d: saved %s (re-run the same command to resume)",
                   progress.step, path)


def _evaluate(task: Task, model: torch.nn.Module, tracker: Tracker, step: int) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model)
    model.train()
    if metrics:
        tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    return metrics
