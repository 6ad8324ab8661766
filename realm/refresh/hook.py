"""The trainer's side of the refresh, as a hook of the shared training core.

On every process: an :class:`IndexWatcher` that swaps new generations in before each step. On the
main process: encoder snapshots every ``every_steps``, the heartbeat, and (optionally) the
refresher child process under a :class:`RefresherSupervisor`. Checkpoints record the generation in
use and pin it (a lease), so a resumed run starts from the same index.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

import torch

from realm.errors import GenerationError
from realm.refresh.rundir import RunStore
from realm.fsutil import best_effort
from realm.index.sharded import ShardedSearch, torch_gather
from realm.errors import RefresherFailed
from realm.refresh.supervisor import RefresherSupervisor, placement
from realm.refresh.watcher import IndexWatcher

logger = logging.getLogger(__name__)


class RefreshHook:
    """Publish encoders, keep the refresher alive, swap index generations between steps.

    The hook starts itself before the first training step (after the core has loaded any
    checkpoint, so a resumed run starts from the checkpoint's generation): it publishes the
    starting encoder, starts the refresher and the watcher, and waits for a first generation.

    Args:
        store: The run's versioned store.
        model: The training model (as given to the core).
        retriever_of: Returns the (unwrapped) retriever to publish, given the training model.
        corpus_fingerprint: Fingerprint of the trainer's corpus.
        dim: Retriever embedding size.
        every_steps: Publish an encoder snapshot every this many optimizer steps.
        is_main: Whether this is the main process (publishes, supervises, heartbeats).
        supervisor: A refresher supervisor to start/check/stop (main process), or None when the
            refresher runs elsewhere (``refresh.spawn=false``).
        poll_s, lease_timeout_s, keep_encoders, gpu, nprobe, ef_search: Watcher and store knobs.
        first_timeout_s: How long to wait for generation 0 at start (the wait ends sooner, with
            the refresher's last log lines, when the refresher is dead for good).
        stale_limit: Staleness in steps beyond which the run warns loudly (0: ten times
            ``every_steps``); with ``stop_when_stale`` it stops with an error instead.
        sync: After each snapshot, wait for the generation built from it and swap it in before
            the next step (every process): a fixed schedule, reproducible across a resume.
        lag_steps: A fixed asynchronous schedule: the generation built from the snapshot of step
            ``s`` is swapped in after step ``s + lag_steps`` (every process), never sooner; the
            trainer waits only when the refresher is slower than that. 0: each generation is
            swapped in as soon as it is loaded.
        agree: With several processes, the element-wise minimum of a list of ints over all of
            them (a collective): every process swaps to a new generation at the same step, and
            starts on the same one, so no step searches two indexes.
        publish_after: Publish no snapshot up to this step (the document encoder is held still
            until then, so the index of generation 0 stays exact).
        barrier: Synchronises the processes (``accelerator.wait_for_everyone``) at start.
        threads: ``(normal, while embedding)``: the trainer's CPU threads, and the fewer it runs
            on while the spawned refresher is busy (it then shares the same cores; a trainer
            whose threads outnumber the free cores stalls at every parallel region). Decided
            before every step (:meth:`share_cores`). None: never changed.
        shard, gpu_device: ``(rank, world)``: this process holds that shard of every generation
            (``index.sharding=ranks``), its index on GPU ``gpu_device`` where there is one.
    """

    def __init__(self, store: RunStore, model, retriever_of: Callable[[Any], Any], *,
                 corpus_fingerprint: str, dim: int, every_steps: int, is_main: bool,
                 supervisor: Optional[RefresherSupervisor] = None, poll_s: float = 2.0,
                 lease_timeout_s: float = 600.0, keep_encoders: int = 2, gpu: bool = True,
                 nprobe: int = 32, ef_search: int = 128, first_timeout_s: float = 3600.0,
                 stale_limit: int = 0, stop_when_stale: bool = False, sync: bool = False,
                 lag_steps: int = 0,
                 agree: Optional[Callable[[list[int]], list[int]]] = None,
                 publish_after: int = 0, barrier: Callable[[], None] = lambda: None,
                 threads: Optional[tuple[int, int]] = None,
                 shard: Optional[tuple[int, int]] = None, gpu_device: Optional[int] = None):
        self.store = store
        self.model = model
        self.retriever_of = retriever_of
        self.every_steps = every_steps
        self.is_main = is_main
        self.supervisor = supervisor
        self.keep_encoders = keep_encoders
        self.first_timeout_s = first_timeout_s
        self.stale_limit = stale_limit or 10 * every_steps
        self.stop_when_stale = stop_when_stale
        self.sync = sync
        self.lag_steps = lag_steps
        self.sync_wait_s = 0.0  # time the trainer waited for the refresher (sync or lag_steps)
        self.agree = agree
        self._stale_warned_at = 0
        self.publish_after = publish_after
        self.barrier = barrier
        self.threads = threads if threads and threads[1] < threads[0] else None
        self.shared_steps = 0  # steps run on the fewer threads
        self.last_published: Optional[int] = None  # encoder step of the newest snapshot
        self.watcher = IndexWatcher(store, corpus_fingerprint=corpus_fingerprint, dim=dim,
                                    poll_s=poll_s, lease_timeout_s=lease_timeout_s, gpu=gpu,
                                    nprobe=nprobe, ef_search=ef_search, shard=shard,
                                    gpu_device=gpu_device)
        self.shard = shard
        self.shards = shard[1] if shard else 1
        self.step = 0
        self.resume_generation: Optional[int] = None
        self.generations_used: set[int] = set()
        self.max_staleness_steps = 0
        self.started_at: Optional[int] = None
        self.stage = "pretrain"  # recorded with each published snapshot

    @classmethod
    def from_config(cls, config, accelerator, model, retriever_of: Callable[[Any], Any], *,
                    corpus_fingerprint: str, dim: int, cpu_threads: int, publish_after: int = 0,
                    stage: str = "pretrain") -> "RefreshHook":
        """The hook a training stage runs with: ``config.refresh`` and ``config.index`` knobs;
        with ``refresh.spawn`` the main process supervises the refresher, which reads
        ``train.run_dir/config.yaml`` (saved by the stage, ``corpus`` filled in).
        ``cpu_threads``: the trainer's threads on the CPU (fewer while the refresher embeds)."""
        r, i, t = config.refresh, config.index, config.train
        supervisor, threads = None, None
        if r.spawn and accelerator.is_main_process:
            processes, env, overrides = placement(r.devices)
            supervisor = RefresherSupervisor(
                t.run_dir, ["--config", os.path.join(t.run_dir, "config.yaml"), "--no-progress",
                            *overrides], max_restarts=r.max_restarts, env=env, processes=processes)
            if accelerator.device.type == "cpu" and r.share_cores:
                threads = (cpu_threads, max(1, cpu_threads - (r.threads or cpu_threads)))
        hook = cls(RunStore(t.run_dir), model, retriever_of,
                   corpus_fingerprint=corpus_fingerprint, dim=dim, every_steps=r.every_steps,
                   is_main=accelerator.is_main_process, supervisor=supervisor, poll_s=r.poll_s,
                   lease_timeout_s=i.lease_timeout_s, keep_encoders=r.keep_encoders, gpu=i.gpu,
                   nprobe=i.nprobe, ef_search=i.ef_search, publish_after=publish_after,
                   barrier=accelerator.wait_for_everyone, threads=threads,
                   first_timeout_s=r.first_generation_timeout_s,
                   stale_limit=r.max_staleness_steps, stop_when_stale=r.stop_when_stale,
                   sync=r.sync, lag_steps=r.lag_steps, agree=_min_over_processes(accelerator),
                   **_shard_of(config.index.sharding, accelerator))
        hook.stage = stage
        return hook

    def searcher(self, accelerator) -> Callable[..., Any]:
        """``search(queries, k, exclude) -> SearchResult`` over the generation in use: the
        watcher's, or with a shard per process a collective every process calls once per step
        (:class:`realm.index.sharded.ShardedSearch`)."""
        if self.shard is None:
            return self.watcher.search
        gather = (torch_gather(accelerator.device) if accelerator.num_processes > 1
                  else lambda tensor: [tensor])
        return ShardedSearch(lambda: self.watcher.current, gather, accelerator.process_index)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, step: int = 0, barrier: Callable[[], None] = lambda: None) -> None:
        """Publish the starting encoder, start the refresher and the watcher, await generation 0."""
        self.step = self.started_at = step
        if self.is_main:
            self.store.clear_done()  # a finished run resumed with more steps
            if step > 0:  # resuming: what a run killed after this checkpoint made is put aside
                self.store.discard_after(step)
            latest = self.store.latest_encoder()
            # a checkpoint that pins a generation resumes on it, publishing nothing the
            # uninterrupted run did not (else the resumed run would drift from it)
            if (self.resume_generation is None and (
                    latest is None or latest["step"] < step or (step == 0 and latest["step"] != 0))
                    or self._due_snapshot_lost(step, latest)):
                self.publish(self.model, step)
            best_effort(self.store.write_heartbeat, step, what="the trainer's heartbeat")
            if self.supervisor is not None:
                self.supervisor.start()
        barrier()
        if self.resume_generation is not None:
            try:
                self.watcher.load(self.resume_generation)
                logger.info("resumed with index generation %d", self.resume_generation)
            except GenerationError as e:
                logger.warning("the checkpoint's index generation %d is gone or corrupt (%s); "
                               "waiting for the newest", self.resume_generation, e)
        self.watcher.start()
        t0 = time.time()
        try:
            gen = self.watcher.wait_for_first(timeout=self.first_timeout_s,
                                              check=self._check_refresher)
        except TimeoutError as e:
            why = f"; {self.supervisor.failure()}" if self.supervisor is not None else ""
            raise RefresherFailed(f"{e} (refresh.first_generation_timeout_s="
                                  f"{self.first_timeout_s:g}){why}") from None
        if self.agree is not None:  # all start on the newest one any of them loaded
            newest = -self.agree([-gen.generation])[0]
            if newest != gen.generation:
                gen = self.watcher.load(newest)
        self.generations_used.add(gen.generation)
        logger.info("index generation %d in use (waited %.1fs)", gen.generation, time.time() - t0)

    def _due_snapshot_lost(self, step: int, latest: Optional[dict]) -> bool:
        """Resuming at ``step`` on a fixed lag: whether the snapshot whose generation is due
        after ``step`` (taken at or before it) is gone with its generation (the store keeps only
        the newest snapshots and generations), so that nothing would ever build what the
        schedule waits for. The checkpoint's encoder is then published in its place: exactly
        the lost snapshot when the checkpoint is of the snapshot's step."""
        if not self.lag_steps:
            return False
        due = step - step % self.every_steps
        if due <= self.publish_after or step >= due + self.lag_steps:
            return False
        built = self.store.read_latest()
        if (latest is not None and latest["step"] >= due) or (
                built is not None and int(built["encoder_step"]) >= due):
            return False
        if step != due:
            logger.warning("the snapshot of step %d, due in the index after step %d, is gone; "
                           "the checkpoint's encoder (step %d) stands in for it", due,
                           due + self.lag_steps, step)
        return True

    def _check_refresher(self) -> None:
        """While waiting for generation 0: restart a dead refresher (within bounds); raise
        :class:`RefresherFailed` with its last log lines once it is dead for good."""
        if self.supervisor is None:
            return
        self.supervisor.check()
        if self.supervisor.gave_up:
            raise RefresherFailed(f"no index generation to train with: "
                                  f"{self.supervisor.failure()}")

    def close(self, finished: bool = True) -> None:
        """Stop the watcher; on the main process write DONE (if finished) and stop the refresher
        (also when stopping the watcher or writing DONE fails: no refresher outlives its run)."""
        try:
            self.watcher.stop()
            if self.threads is not None:
                torch.set_num_threads(self.threads[0])  # not left on the fewer threads
            if self.is_main and finished:
                self.store.mark_done({"step": self.step})
        finally:
            if self.is_main and self.supervisor is not None:
                # finished: it sees DONE and exits; interrupted: no DONE (the run resumes later)
                self.supervisor.stop(timeout=60 if finished else 0)

    def publish(self, model, step: int) -> None:
        self.store.publish_encoder(self.retriever_of(model), step, keep=self.keep_encoders,
                                   metadata={"stage": self.stage})
        self.last_published = step

    # -- training-core hook API -----------------------------------------------------------------

    def before_step(self, step: int) -> None:
        if self.started_at is None:
            self.start(step, self.barrier)
            if self.resume_generation is not None:
                return  # the first resumed step runs on the checkpoint's generation: reproducible
        if not self.lag_steps and self._swap():  # (on a fixed lag, after_step swaps)
            self.generations_used.add(self.watcher.current.generation)
            if self.supervisor is not None:
                self.supervisor.reset_budget()
        if self.threads is not None and self.supervisor is not None:
            self.share_cores(self.supervisor.cpu_fraction())

    def _swap(self) -> bool:
        """Swap in the loaded newer generation; with several processes only when every one of
        them holds the same one (one collective per step), so all swap at the same step."""
        if self.agree is None:
            return self.watcher.maybe_swap()
        pending = self.watcher.pending_generation
        low, minus_high = self.agree([pending, -pending])
        if low < 0 or low != -minus_high:
            return False  # someone has nothing new yet, or another generation: swap later
        return self.watcher.maybe_swap()

    def share_cores(self, refresher_cores: float) -> int:
        """Run on fewer threads while the refresher is busy, on all of them otherwise. Busy: it
        kept more than half a core busy since the last step, or it is running and the newest
        snapshot has no generation in use yet (the trainer knows the refresher starts on it at
        once; waiting to see its CPU time would cost one step on all threads against it).
        Returns the threads the next step runs on."""
        current = self.watcher.current
        awaiting = (self.last_published is not None and self.supervisor is not None
                    and self.supervisor.alive
                    and (current is None or current.encoder_step < self.last_published))
        want = self.threads[1] if refresher_cores > 0.5 or awaiting else self.threads[0]
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
        self.shared_steps += want == self.threads[1]
        return want

    def after_step(self, step: int, model) -> None:
        self.step = step
        publishing = step % self.every_steps == 0 and step > self.publish_after
        if self.is_main:
            best_effort(self.store.write_heartbeat, step, what="the trainer's heartbeat")
            if self.supervisor is not None:
                self.supervisor.check()
            if publishing:
                self.publish(model, step)
        if publishing and self.sync:  # every process: the next step reads the new generation
            self._await_encoder(step, "refresh.sync")
        published = step - self.lag_steps  # the snapshot whose generation is due now
        if self.lag_steps and published > self.publish_after and published % self.every_steps == 0:
            self._await_encoder(published, f"refresh.lag_steps={self.lag_steps}")
        # the index the next step reads against this step's encoder (what the logged record shows)
        current = self.watcher.current
        if current is not None:
            staleness = step - current.encoder_step
            self.max_staleness_steps = max(self.max_staleness_steps, staleness)
            self._check_staleness(step, staleness)

    def _await_encoder(self, encoder_step: int, why: str) -> None:
        """Wait (every process) for the generation built from ``encoder_step``'s snapshot and
        swap it in before the next step."""
        t0 = time.time()
        try:
            gen = self.watcher.wait_for_encoder(encoder_step, timeout=self.first_timeout_s,
                                                check=self._check_refresher)
        except TimeoutError as e:
            raise RefresherFailed(f"{e} ({why})") from None
        self.generations_used.add(gen.generation)
        self.sync_wait_s += time.time() - t0

    def _check_staleness(self, step: int, staleness: int) -> None:
        """Warn loudly (again every ``stale_limit`` steps) when the index in use is older than
        ``stale_limit`` steps; with ``stop_when_stale``, stop the run."""
        if staleness <= self.stale_limit:
            self._stale_warned_at = 0
            return
        why = ("" if self.supervisor is None or self.supervisor.alive
               else f"; {self.supervisor.failure()}")
        message = (f"the index in use (generation {self.watcher.current.generation}) is "
                   f"{staleness} steps stale, beyond refresh.max_staleness_steps="
                   f"{self.stale_limit}: retrieval trains against an old encoder{why}")
        if self.stop_when_stale:
            raise RefresherFailed(message + " (refresh.stop_when_stale=true)")
        if not self._stale_warned_at or step - self._stale_warned_at >= self.stale_limit:
            self._stale_warned_at = step
            logger.error("%s", message)

    def metrics(self, step: int) -> dict[str, Any]:
        out = self.watcher.metrics(step)
        out["index/generations_used"] = len(self.generations_used)
        if self.supervisor is not None:
            out["refresh/restarts"] = self.supervisor.restarts
            out["refresh/alive"] = int(self.supervisor.alive)
        if self.sync or self.lag_steps:
            out["refresh/sync_wait_s"] = round(self.sync_wait_s, 3)
        if self.agree is not None and self.watcher.current is not None:
            gen = self.watcher.current.generation  # (every process calls metrics: a collective)
            low, minus_high = self.agree([gen, -gen])
            out["index/generation_spread"] = -minus_high - low  # 0: all search the same one
        if self.threads is not None:
            out["train/threads"] = torch.get_num_threads()
            out["train/shared_steps"] = self.shared_steps
        return out

    def state_dict(self) -> dict[str, Any]:
        """The generation in use (pinned by a lease named after the checkpoint's step)."""
        current = self.watcher.current
        if current is None:
            return {"generation": None, "step": self.step}
        if self.is_main:
            best_effort(self.store.acquire_lease, f"checkpoint-step-{self.step:06d}",
                        current.generation, pinned=True, what="pinning the checkpoint's generation")
            self._unpin_removed_checkpoints()
        return {"generation": current.generation, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_generation = state.get("generation")

    def _unpin_removed_checkpoints(self) -> None:
        """Release pins of checkpoints that no longer exist (the training core keeps the newest K)."""
        ckpt_root = os.path.join(self.store.root, "checkpoints") if self.store.local else None
        if ckpt_root is None or not os.path.isdir(ckpt_root):
            return
        existing = set(os.listdir(ckpt_root))
        for holder in self.store.leases():
            if not holder.startswith("checkpoint-step-"):
                continue
            step = int(holder.rsplit("-", 1)[1])
            if step < self.step and holder[len("checkpoint-"):] not in existing:
                self.store.release_lease(holder)


def _shard_of(sharding: str, accelerator) -> dict[str, Any]:
    """The watcher's ``shard`` and ``gpu_device`` for ``index.sharding`` on this process."""
    if sharding != "ranks":
        return {}
    on_gpu = accelerator.device.type == "cuda"
    return {"shard": (accelerator.process_index, accelerator.num_processes),
            "gpu_device": accelerator.local_process_index if on_gpu else None}


def _min_over_processes(accelerator) -> Optional[Callable[[list[int]], list[int]]]:
    """Element-wise minimum of a list of ints over the processes (None with one process)."""
    if accelerator.num_processes == 1:
        return None
    import torch.distributed as dist

    def reduce(values: list[int]) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64, device=accelerator.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return [int(v) for v in tensor.tolist()]

    return reduce
