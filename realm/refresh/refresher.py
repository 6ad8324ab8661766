"""The index refresher: a long-running process that re-embeds the corpus and commits generations.

Loop (see ``docs/refresh.md``)::

    lock the run (one refresher per run) -> remove what a killed refresher left
    until DONE or the trainer's heartbeat is stale:
        newest encoder snapshot newer than the one behind index/LATEST?
            embed the shards of the corpus not yet done for that snapshot, committing each
            (index/building/, realm.index.building) -> build the faiss index ->
            write index/gen-N/ from the shards -> replace index/LATEST -> GC
        else sleep refresh.poll_s

Several processes (``accelerate launch`` / ``torchrun``) share the embedding: each embeds its
share of the shards and writes them itself; the main process builds and commits one generation
from the files. A refresher restarted for the same snapshot embeds only the missing shards.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from realm.data.store import BlockStore, check_tokenizer
from realm.modeling.retriever import Retriever
from realm.precision import autocast_dtype
from realm.fsutil import failpoint, write_errors
from realm.modeling.embed import embed_blocks, special_ids
from realm.index.building import GenerationBuild
from realm.index.mips import MipsIndex
from realm.index.shards import SHARD_BLOCKS, Segment, read_segment_rows
from realm.refresh.rundir import RunStore

logger = logging.getLogger(__name__)


@dataclass
class RefreshSettings:
    """What the refresher needs (built from the ``index`` and ``refresh`` config sections)."""

    factory: str = "Flat"
    nprobe: int = 32
    ef_search: int = 128
    train_size: int = 262144
    gpu: bool = True
    keep_generations: int = 2
    lease_timeout_s: float = 600.0
    poll_s: float = 2.0
    heartbeat_timeout_s: float = 900.0
    precision: str = "auto"
    max_tokens_per_batch: int = 16384
    max_block_tokens: int = 288
    device: str = "auto"
    shard_blocks: int = SHARD_BLOCKS

    @classmethod
    def from_config(cls, config) -> "RefreshSettings":
        i, r = config.index, config.refresh
        return cls(factory=i.factory, nprobe=i.nprobe, ef_search=i.ef_search,
                   train_size=i.train_size, gpu=i.gpu, keep_generations=i.keep_generations,
                   lease_timeout_s=i.lease_timeout_s, poll_s=r.poll_s,
                   heartbeat_timeout_s=r.heartbeat_timeout_s, precision=r.precision,
                   max_tokens_per_batch=r.max_tokens_per_batch,
                   max_block_tokens=config.retriever.max_block_tokens, device=r.device,
                   shard_blocks=i.shard_blocks)


class _Dist:
    """Rank, world size and collectives of the refresher's processes (one process: trivial)."""

    def __init__(self) -> None:
        self.on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.on else 0
        self.world = torch.distributed.get_world_size() if self.on else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        if not self.on:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.on:
            torch.distributed.barrier()


def _device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def parent_alive(pid: int) -> bool:
    """Whether ``pid`` is still this process's parent, or its parent's (a refresher of several
    processes runs under torchrun): a dead parent's children are re-parented, so a recycled pid
    does not fool it."""
    if os.getppid() == pid:
        return True
    import psutil

    try:
        return psutil.Process(os.getppid()).ppid() == pid
    except psutil.Error:
        return False


def exit_with_parent(pid: int, on_exit: Callable[[], None],
                     poll_s: float = 1.0) -> threading.Thread:
    """A daemon thread that calls ``on_exit`` and ends this process (exit 4) when ``pid`` stops
    being its parent: a refresher whose trainer was killed (even by ``kill -9``) does not live on
    holding the run's lock, whatever it is doing. Every commit is atomic, so leaving at any
    moment leaves the store readable."""

    def watch() -> None:
        while parent_alive(pid):
            time.sleep(poll_s)
        logger.warning("the trainer (pid %d) is gone; the refresher exits", pid)
        try:
            on_exit()
        finally:
            os._exit(4)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


class Refresher:
    """Re-embeds ``corpus`` with each new encoder snapshot of the run and commits generations.

    Args:
        store: The run's versioned store.
        corpus: The block store to embed.
        settings: Index and loop settings.
        tracker: Metrics (main process); optional.
        progress: Show a progress bar while embedding.
        parent_pid: The trainer that spawned this refresher: when it is gone, stop (between
            generations here; :func:`exit_with_parent` also ends an embedding under way).
    """

    def __init__(self, store: RunStore, corpus: BlockStore, settings: RefreshSettings,
                 tracker=None, progress: bool = False, parent_pid: Optional[int] = None):
        self.store = store
        self.corpus = corpus
        self.s = settings
        self.tracker = tracker
        self.progress = progress
        self.dist = _Dist()
        self.device = _device(settings.device)
        self.owner = f"refresher-{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.started = time.time()
        self.committed: list[dict[str, Any]] = []
        self._validated: set[int] = set()
        self.parent_pid = parent_pid

    # -- the loop -------------------------------------------------------------------------

    def finished(self) -> Optional[str]:
        """Why the refresher should stop now (``"done"``, ``"heartbeat"``, ``"trainer gone"``),
        or None."""
        if self.store.is_done():
            return "done"
        if self.parent_pid is not None and not parent_alive(self.parent_pid):
            return "trainer gone"
        timeout = self.s.heartbeat_timeout_s
        if timeout > 0:
            beat = self.store.read_heartbeat()
            last = beat["time"] if beat else self.started
            if time.time() - max(last, self.started) > timeout:
                return "heartbeat"
        return None

    def pending_snapshot(self) -> Optional[dict[str, Any]]:
        """The newest encoder snapshot if it is newer than the one behind ``index/LATEST``, or if
        the generation ``LATEST`` names does not validate (a corrupt generation is not "up to
        date": it is rebuilt)."""
        snapshot = self.store.latest_encoder()
        if snapshot is None:
            return None
        latest = self.store.read_latest()
        if (latest is not None and int(latest["encoder_step"]) >= snapshot["step"]
                and self._intact(int(latest["generation"]))):
            return None
        return snapshot

    def _intact(self, generation: int) -> bool:
        """Whether ``generation`` validates (checked once per generation number)."""
        if generation not in self._validated:
            why = self.store.validate_generation(generation, self.corpus.fingerprint)
            if why is not None:
                logger.warning("index/LATEST names generation %d, which does not validate (%s); "
                               "re-embedding", generation, why)
                return False
            self._validated.add(generation)
        return True

    def run(self, once: bool = False, max_generations: Optional[int] = None) -> dict[str, Any]:
        """Refresh until the run finishes (or after one generation with ``once``)."""
        t0 = time.time()
        if self.dist.main:
            self.store.acquire_refresher_lock(self.owner)
        try:
            if self.dist.main:
                self.store.clean_orphans()
                logger.info("refresher %s on %s: %d blocks, %d process(es), device %s",
                            self.owner, self.store.url, len(self.corpus), self.dist.world,
                            self.device)
            reason = None
            while True:
                decision = None
                if self.dist.main:
                    reason = self.finished()
                    snapshot = None if reason else self.pending_snapshot()
                    if snapshot is None and once and reason is None:
                        latest = self.store.read_latest()
                        if self.store.latest_encoder() is None:
                            reason = "no encoder snapshot"
                        elif latest is not None:
                            reason = "up to date"
                    decision = {"reason": reason, "snapshot": snapshot}
                decision = self.dist.broadcast(decision)
                if decision["reason"]:
                    reason = decision["reason"]
                    break
                if decision["snapshot"] is not None:
                    self.refresh(decision["snapshot"])
                    if once or (max_generations and len(self.committed) >= max_generations):
                        reason = "once" if once else "max_generations"
                        break
                    continue
                self.store.touch_refresher_lock()
                time.sleep(self.s.poll_s)
        finally:
            if self.dist.main:
                self.store.release_refresher_lock()
        logger.info("refresher stops (%s) after %d generation(s)", reason, len(self.committed))
        return {"reason": reason, "generations": [c["generation"] for c in self.committed],
                "seconds": round(time.time() - t0, 2),
                **({k: self.committed[-1][k] for k in ("blocks_per_s", "total_s")}
                   if self.committed else {})}

    # -- one generation -------------------------------------------------------------------

    def refresh(self, snapshot: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Embed the corpus with ``snapshot``'s document encoder and commit a generation: the
        shards not yet done for this snapshot, each committed as it is done, shared among the
        processes; then (main process) the index and the commit."""
        t_start = time.perf_counter()
        step = snapshot["step"]
        with self.store.local_encoder(snapshot["path"]) as path:
            retriever = Retriever.from_pretrained(path, device=self.device)
        if retriever.tokenizer is None:
            raise ValueError(f"{snapshot['path']}: the snapshot has no tokenizer")
        check_tokenizer(retriever.tokenizer, self.corpus)
        load_s = time.perf_counter() - t_start
        bf16 = autocast_dtype(self.s.precision, self.device) == "bf16"

        n = len(self.corpus)
        build = GenerationBuild(self.store, {  # what the shards depend on: one build per plan
            "encoder_step": step, "snapshot": self.store.snapshot_digest(snapshot["path"]),
            "corpus_fingerprint": self.corpus.fingerprint, "n_blocks": n, "dim": retriever.dim,
            "shard_blocks": self.s.shard_blocks, "precision": "bf16" if bf16 else "fp32",
            "device": self.device.type, "max_block_tokens": self.s.max_block_tokens,
            "max_tokens_per_batch": self.s.max_tokens_per_batch})
        where = f"writing an index generation under {self.store.path('index')}"
        local = self.store.path("index") if self.store.local else None
        kept = "nothing was committed (index/LATEST is unchanged)"
        with write_errors(where, local, kept):
            done = build.prepare() if self.dist.main else None
        done = self.dist.broadcast(done)
        missing = [i for i in range(len(build.bounds)) if i not in set(done)]
        if done and self.dist.main:
            logger.info("generation of encoder step %d resumed: %d of %d shards were done; "
                        "embedding the other %d", step, len(done), len(build.bounds),
                        len(missing))
        failpoint("embed")
        with write_errors(where, local, kept + "; the shards done are kept for the next try"):
            embed_s = self._embed_shards(build, retriever, missing[self.dist.rank::self.dist.world],
                                         bf16)
        del retriever
        self.dist.barrier()  # every shard written
        if not self.dist.main:
            self.dist.barrier()
            return None
        embed_wall = time.perf_counter() - t_start - load_s
        embedded = sum(build.bounds[i][1] - build.bounds[i][0] for i in missing)

        t0 = time.perf_counter()
        index_bytes = None
        if self.s.factory != "Flat":
            index = MipsIndex.build(self._rows(build), self.s.factory,
                                    train_size=self.s.train_size, nprobe=self.s.nprobe,
                                    ef_search=self.s.ef_search, gpu=False)
            index_bytes = index.to_bytes()
            del index
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        timings = {"load_encoder_s": round(load_s, 3), "embed_s": round(embed_wall, 3),
                   "embed_shard_s": round(embed_s, 3), "build_s": round(build_s, 3)}
        blocks_per_s = embedded / max(embed_wall, 1e-9)
        with write_errors(where, local, kept):
            generation = self.store.commit_build(
                build, encoder_step=step, corpus_fingerprint=self.corpus.fingerprint,
                factory=self.s.factory, index_bytes=index_bytes, timings=timings,
                extra={"encoder_time": snapshot.get("time"), "refresher": self.owner,
                       "processes": self.dist.world, "precision": "bf16" if bf16 else "fp32",
                       "device": str(self.device), "blocks_per_s": round(blocks_per_s, 2),
                       "blocks_embedded": embedded, "shards_resumed": len(done)})
        commit_s = time.perf_counter() - t0
        self.store.gc_generations(self.s.keep_generations, self.s.lease_timeout_s)
        total_s = time.perf_counter() - t_start
        record = {"generation": generation, "encoder_step": step, "blocks": n,
                  "blocks_embedded": embedded, "shards": len(build.bounds),
                  "shards_resumed": len(done), "blocks_per_s": round(blocks_per_s, 2),
                  "total_s": round(total_s, 3), "commit_s": round(commit_s, 3), **timings}
        if snapshot.get("time"):
            record["publish_to_commit_s"] = round(time.time() - snapshot["time"], 3)
        self.committed.append(record)
        logger.info("generation %d: %d blocks (%d embedded now) at %.1f blocks/s, %.1fs in all",
                    generation, n, embedded, blocks_per_s, total_s)
        if self.tracker is not None:
            self.tracker.log({f"refresh/{k}": v for k, v in record.items()}, step=step)
        self.dist.barrier()
        return record

    def _embed_shards(self, build: GenerationBuild, retriever, shards: list[int],
                      bf16: bool) -> float:
        """Embed and commit ``shards`` of ``build`` one by one; returns the seconds spent."""
        from tqdm.auto import tqdm

        special = special_ids(retriever.tokenizer)
        sizes = [build.bounds[i][1] - build.bounds[i][0] for i in shards]
        bar = tqdm(total=sum(sizes), desc="embed blocks", unit=" blocks", mininterval=1.0,
                   disable=not (self.progress and self.dist.main))
        seconds, last_log = 0.0, time.perf_counter()
        for count, shard in enumerate(shards, 1):
            start, end = build.bounds[shard]
            emb, stats = embed_blocks(retriever, self.corpus, special,
                                      np.arange(start, end, dtype=np.int64),
                                      self.s.max_block_tokens, self.s.max_tokens_per_batch,
                                      bf16=bf16, progress=False)
            seconds += stats["seconds"]
            build.write_shard(shard, emb.astype(np.float16))
            bar.update(end - start)
            if time.perf_counter() - last_log >= 30.0 or count == len(shards):
                last_log = time.perf_counter()
                logger.info("embedded %d/%d shards of this process (%d blocks, %.1f blocks/s)",
                            count, len(shards), sum(sizes[:count]),
                            sum(sizes[:count]) / max(seconds, 1e-9))
            failpoint(f"shard-{count}")  # (tests: kill -9 after this process's count-th shard)
        bar.close()
        return seconds

    def _rows(self, build: GenerationBuild) -> np.ndarray:
        """Every row of a finished build, read back from its shard files (to train an index)."""
        segments = [Segment(s["file"], s["start"], s["end"], s["bytes"], s["sha256"])
                    for s in build.shards()]
        return read_segment_rows(self.store.fs, build.dir, segments, int(build.plan["dim"]),
                                 (0, int(build.plan["n_blocks"])))
