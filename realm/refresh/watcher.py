"""The trainer's side of the refresh: watch ``index/LATEST``, load off-thread, swap between steps.

A watcher thread polls the pointer, loads and validates each new generation in the background
(checksums, corpus fingerprint, dim) and parks it; the training loop calls :meth:`maybe_swap`
between steps, which only replaces a reference: the lease files that follow a swap are written,
and the old generation is freed, by the watcher thread (woken by the swap), which also runs at a
lower CPU priority than the training thread where the OS allows it. A training step never waits
for the refresher; only the first generation is awaited at start (:meth:`wait_for_first`). A
rejected generation is logged and counted, and the old one stays in use.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Optional

import numpy as np

from realm.fsutil import best_effort
from realm.index.mips import SearchResult
from realm.index.generations import Generation
from realm.refresh.rundir import RunStore
from realm.errors import GenerationError

logger = logging.getLogger(__name__)


def lower_priority(niceness: int = 10) -> bool:
    """Lower the calling thread's CPU priority (Linux: a thread id is a valid ``setpriority``
    target), so that background loading yields the cores to the training thread. Returns
    whether it could."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
        return True
    except (AttributeError, OSError):  # not Linux, or not allowed
        return False


class IndexWatcher:
    """Keeps the newest valid index generation of a run ready for the training loop.

    Args:
        store: The run's versioned store.
        corpus_fingerprint: Fingerprint of the corpus the trainer reads (generations of another
            corpus are rejected).
        dim: Retriever embedding size (generations of another size are rejected).
        poll_s: Seconds between looks at ``index/LATEST``.
        lease_timeout_s: Lease lifetime; leases are renewed every poll.
        gpu, nprobe, ef_search: Index placement and search breadth.
        shard: ``(rank, world)``: hold that shard of every generation (``index.sharding=ranks``).
        gpu_device: The one GPU its index goes to (None: all of them).
    """

    def __init__(self, store: RunStore, *, corpus_fingerprint: Optional[str], dim: Optional[int],
                 poll_s: float = 2.0, lease_timeout_s: float = 600.0, gpu: bool = True,
                 nprobe: int = 32, ef_search: int = 128, verify: bool = True,
                 shard: Optional[tuple[int, int]] = None, gpu_device: Optional[int] = None):
        self.store = store
        self.fingerprint = corpus_fingerprint
        self.dim = dim
        self.poll_s = poll_s
        self.lease_timeout_s = lease_timeout_s
        self.load_kwargs = {"gpu": gpu, "nprobe": nprobe, "ef_search": ef_search, "verify": verify,
                            "shard": shard, "gpu_device": gpu_device}
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.current: Optional[Generation] = None
        self._pending: Optional[Generation] = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()  # a swap happened: write its leases now
        self._pending_lease: Optional[int] = None  # generation the "-pending" lease holds
        self._retired: list[Generation] = []  # swapped out, freed by the watcher thread
        self._thread: Optional[threading.Thread] = None
        self.rejected: dict[int, str] = {}
        self.swaps = 0
        self.last_load_s = float("nan")
        self.last_swap_s = float("nan")
        self.poll_errors = 0

    # -- background thread ------------------------------------------------------------------

    def start(self) -> "IndexWatcher":
        self._thread = threading.Thread(target=self._loop, name="index-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.store.release_lease(self.holder)
        self.store.release_lease(self.holder + "-pending")

    def _newest_held(self) -> int:
        with self._lock:
            held = [g.generation for g in (self.current, self._pending) if g is not None]
        return max(held, default=-1)

    def _loop(self) -> None:
        lower_priority()
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # keep watching: a flaky read must not end hot swapping
                self.poll_errors += 1
                logger.exception("index watcher: poll failed; will retry")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _update_leases(self) -> None:
        """Renew the lease on the generation in use; once a swap put the pending one in use,
        drop its "-pending" lease and free what was swapped out (the work a swap leaves)."""
        with self._lock:
            current, retired, self._retired = self.current, self._retired, []
        del retired  # (the last reference to a swapped-out index: freed on this thread)
        if current is None:
            return
        self.store.acquire_lease(self.holder, current.generation)  # renew (or move, after a swap)
        if self._pending_lease is not None and self._pending_lease <= current.generation:
            self.store.release_lease(self.holder + "-pending")
            self._pending_lease = None

    def poll_once(self) -> Optional[int]:
        """Look at ``index/LATEST`` once; load a newer valid generation. Returns its number.

        When the generation ``LATEST`` names does not validate, the newest older one that does
        (and is newer than the one in use) is loaded instead: a corrupt newest generation never
        leaves the trainer without an index while an intact one is on disk."""
        self._update_leases()
        latest = self.store.read_latest()
        if latest is None:
            return None
        newest, held = int(latest["generation"]), self._newest_held()
        if newest <= held:
            return None
        older = sorted((g for g in self.store.generations() if held < g < newest), reverse=True)
        for generation in [newest, *older]:
            if generation in self.rejected:
                continue
            # Hold a lease before reading, so garbage collection keeps the files while we load.
            self.store.acquire_lease(self.holder + "-pending", generation)
            self._pending_lease = generation
            t0 = time.perf_counter()
            try:
                loaded = self.store.load_generation(generation, corpus_fingerprint=self.fingerprint,
                                                    dim=self.dim, **self.load_kwargs)
            except GenerationError as e:
                self.rejected[generation] = str(e)
                self.store.release_lease(self.holder + "-pending")
                self._pending_lease = None
                logger.warning("rejected index generation %d, keeping generation %s: %s",
                               generation, self.current.generation if self.current else None, e)
                continue
            self.last_load_s = time.perf_counter() - t0
            with self._lock:
                self._pending = loaded
            self._ready.set()
            logger.info("index generation %d loaded in %.2fs (encoder step %d); swapping in at "
                        "the next step", generation, self.last_load_s, loaded.encoder_step)
            return generation
        return None

    # -- training thread ----------------------------------------------------------------------

    def load(self, generation: int) -> Generation:
        """Load ``generation`` now and put it in use (resuming from a checkpoint that names it)."""
        self.store.acquire_lease(self.holder, generation)
        t0 = time.perf_counter()
        loaded = self.store.load_generation(generation, corpus_fingerprint=self.fingerprint,
                                            dim=self.dim, **self.load_kwargs)
        self.last_load_s = time.perf_counter() - t0
        with self._lock:
            self.current = loaded
        return loaded

    def _wait(self, ready: Callable[[], bool], timeout: Optional[float],
              check: Optional[Callable[[], None]]) -> bool:
        """Poll (or let the watcher thread poll) until ``ready()``; ``check()`` every round.
        Returns False when ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            if self._thread is None:
                self.poll_once()
                if ready():
                    break
            if check is not None:
                check()
            wait = self.poll_s if deadline is None else min(self.poll_s, deadline - time.monotonic())
            if wait <= 0:
                return False
            self._ready.wait(wait)
        return True

    def wait_for_first(self, timeout: Optional[float] = None,
                       check: Optional[Callable[[], None]] = None) -> Generation:
        """Block until a generation is available (only at start), then swap it in. ``check`` is
        called every poll while waiting (e.g. the refresher's supervisor: it raises when the
        refresher is gone for good, so nobody waits out the whole timeout on a dead process)."""
        if self.current is None:
            self._wait(lambda: self._pending is not None, timeout, check)
            if not self.maybe_swap():
                raise TimeoutError(f"{self.store.url}: no valid index generation after "
                                   f"{timeout}s (is the refresher running?)")
        return self.current

    def wait_for_encoder(self, step: int, timeout: Optional[float] = None,
                         check: Optional[Callable[[], None]] = None) -> Generation:
        """Block until a generation built from an encoder snapshot of ``step`` or later is
        loaded, and swap it in (``refresh.sync``: a fixed refresh schedule). ``check`` as in
        :meth:`wait_for_first`."""

        def ready() -> bool:
            if self._pending is not None:
                self.maybe_swap()
            return self.current is not None and self.current.encoder_step >= step

        if not self._wait(ready, timeout, check):
            raise TimeoutError(f"{self.store.url}: no index generation from the encoder of "
                               f"step {step} after {timeout}s (is the refresher running?)")
        return self.current

    @property
    def pending_generation(self) -> int:
        """The loaded generation waiting to be swapped in, or -1."""
        pending = self._pending
        return -1 if pending is None else pending.generation

    def maybe_swap(self) -> bool:
        """Swap in a loaded newer generation, if any (call between training steps). Only a
        reference changes here; the watcher thread, woken, moves the leases and frees the old
        generation (without a watcher thread, that happens here)."""
        if self._pending is None:
            return False
        t0 = time.perf_counter()
        with self._lock:
            new, self._pending = self._pending, None
            old, self.current = self.current, new
            self._ready.clear()
            if old is not None:
                self._retired.append(old)
        del old
        if self._thread is None:
            best_effort(self._update_leases, what="an index lease")
        else:
            self._wake.set()
        self.last_swap_s = time.perf_counter() - t0
        self.swaps += 1
        logger.info("swapped in index generation %d", new.generation)
        return True

    def search(self, queries: np.ndarray, k: int, exclude=None) -> SearchResult:
        """Top-``k`` blocks per query from the generation in use (see MipsIndex.search)."""
        current = self.current
        if current is None:
            raise RuntimeError("no index generation in use yet (call wait_for_first)")
        return current.search(queries, k, exclude)

    def metrics(self, step: Optional[int] = None) -> dict[str, Any]:
        """Generation in use, staleness in steps and seconds, load and swap time, rejections."""
        cur = self.current
        out: dict[str, Any] = {"index/swaps": self.swaps, "index/rejected": len(self.rejected),
                               "index/load_s": self.last_load_s, "index/swap_s": self.last_swap_s}
        if cur is not None:
            out["index/generation"] = cur.generation
            out["index/encoder_step"] = cur.encoder_step
            if step is not None:
                out["index/staleness_steps"] = step - cur.encoder_step
            published = cur.manifest.get("encoder_time")
            if published:
                out["index/staleness_s"] = time.time() - float(published)
        return out
