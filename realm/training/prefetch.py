"""Retrieval for the next batch on a background thread while the current step runs
(``pretrain.prefetch``): its query embeddings, search and inputs, handed to REALM's forward."""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from realm.data.mlm import MLMBatch
from realm.modeling.inputs import build_query_inputs
from realm.modeling.realm import REALM, Retrieved, Searcher


@dataclass
class Prefetched(Retrieved):
    """A batch's retrieval done ahead of its step (:class:`RetrievalPrefetch`): its search and,
    without re-ranking (which needs the step's document encoder), its inputs."""

    seconds: float  # on the prefetch thread


class RetrievalPrefetch:
    """Search and input assembly for the next batch on a background thread, during this step.

    The training core calls ``submit(model, next_batch)`` after the step's swap and before its
    forward. One worker thread then (1) copies the query encoder's weights into a private copy,
    while the step's forward reads the same weights; the step waits for that copy
    (:meth:`wait_for_copy`, called after its forward) before its backward and optimizer update
    change them; (2) embeds the next batch's queries with the copy (eval mode: no dropout; the
    step's autocast), searches the generation in use, and assembles the block and reader inputs
    (:meth:`REALM.retrieve`; not with re-ranking, which needs the next step's document encoder).
    The next step's ``take(batch)`` waits for the result.

    Which weights search: batch t + 1 is searched with the query encoder of step t, one
    optimizer step older than the weights that embed its queries for the scores that get the
    gradient (inline, without prefetch, the search uses those same-step weights, with dropout).
    REALM's index is already many steps stale, so one step more is small beside it. A batch with
    nothing prefetched (the first of a run, of an epoch, of a resumed run) is searched inline.
    The searcher must be local to the process: a sharded search is a collective and is refused.
    """

    def __init__(self, searcher: Searcher, autocast: Optional[Callable[[], Any]] = None):
        if getattr(searcher, "collective", False):
            raise ValueError("pretrain.prefetch searches on a background thread; a sharded search "
                             "(index.sharding=ranks) is a collective every process calls in "
                             "step: use one or the other")
        self.searcher = searcher
        self.autocast = autocast
        self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix="realm-prefetch")
        self._copy: Optional[nn.Module] = None  # used by one job at a time (one worker)
        # (batch, future, weights copied), oldest first: the batch about to be read, the next
        self._pending: list[tuple[MLMBatch, Any, threading.Event]] = []
        self.waited_s = self.last_wait_s = 0.0  # training-thread time waiting for the thread
        self.work_s = 0.0  # prefetch-thread time
        self.hits = self.misses = 0

    def _snapshot(self, live: nn.Module) -> nn.Module:
        """A private copy of ``live`` (eval mode, no grad), its weights refreshed in place."""
        if self._copy is None:
            self._copy = copy.deepcopy(live).eval().requires_grad_(False)
        else:
            with torch.no_grad():
                for mine, theirs in zip(self._copy.state_dict().values(),
                                        live.state_dict().values()):
                    mine.copy_(theirs)
        return self._copy

    def submit(self, model: REALM, batch: MLMBatch) -> None:
        """Start the batch's retrieval (after the current batch's, which the step takes next;
        older unclaimed ones are dropped)."""
        model = getattr(model, "module", model)
        while len(self._pending) > 1:
            self._drop(self._pending.pop(0))
        copied = threading.Event()
        job = self._pool.submit(self._work, model, batch, copied)
        self._pending.append((batch, job, copied))

    def wait_for_copy(self) -> None:
        """Block until every submitted job holds its copy of the weights (before they change)."""
        t0 = time.perf_counter()
        for _, _, copied in self._pending:
            copied.wait()
        self.waited_s += time.perf_counter() - t0

    def _work(self, model: REALM, batch: MLMBatch, copied: threading.Event) -> Prefetched:
        """(On the prefetch thread.) Copy the query encoder, embed the batch's queries ``[B, dim]``
        with the copy, search and assemble."""
        t0 = time.perf_counter()
        try:
            query_encoder = self._snapshot(model.retriever.query_encoder)
        finally:
            copied.set()
        cls_id, sep_id, pad_id = model.special
        device = next(query_encoder.parameters()).device
        q_in = build_query_inputs(batch.query_ids, cls_id, sep_id, pad_id,
                                  max_length=model.max_query_tokens + 2)
        with torch.no_grad(), (self.autocast() if self.autocast else contextlib.nullcontext()):
            q_reps = query_encoder(*(t.to(device) for t in q_in))
        ahead = model.retrieve(batch, q_reps, self.searcher, rerank=False)
        return Prefetched(ahead.found, ahead.assembled, time.perf_counter() - t0)

    def take(self, batch: MLMBatch) -> Optional[Prefetched]:
        """The prefetched retrieval of ``batch`` (waiting for it), or None if it was not."""
        mine = next((i for i, entry in enumerate(self._pending) if entry[0] is batch), None)
        if mine is None:
            self.misses += 1
            self.last_wait_s = 0.0
            return None
        for entry in self._pending[:mine]:  # submitted before it and never claimed
            self._drop(entry)
        job = self._pending[mine][1]
        del self._pending[: mine + 1]
        t0 = time.perf_counter()
        result = job.result()
        self.last_wait_s = time.perf_counter() - t0
        self.waited_s += self.last_wait_s
        self.work_s += result.seconds
        self.hits += 1
        return result

    def summary(self) -> dict[str, Any]:
        """Batches prefetched / searched inline, and seconds per prefetched batch: the
        training thread's wait and the prefetch thread's work (what the overlap hid)."""
        n = max(1, self.hits)
        return {"hits": self.hits, "misses": self.misses,
                "wait_s_per_batch": round(self.waited_s / n, 5),
                "work_s_per_batch": round(self.work_s / n, 5)}

    @staticmethod
    def _drop(entry: tuple[MLMBatch, Any, threading.Event]) -> None:
        entry[1].cancel()
        try:
            entry[1].result()
        except futures.CancelledError:
            entry[2].set()  # (never started: nothing to copy)
        except Exception:  # noqa: BLE001 (an unclaimed batch's failure is nobody's)
            pass

    def close(self) -> None:
        for entry in self._pending:
            self._drop(entry)
        self._pending = []
        self._pool.shutdown(wait=True)
