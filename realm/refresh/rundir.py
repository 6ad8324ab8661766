"""The run directory that the trainer and the refresher share (a local path or fsspec URL)::

    snapshots/step-000500/       immutable retriever snapshot (Retriever.save_pretrained)
    snapshots/LATEST             {"step": 500, "path": "step-000500", ...}: the newest snapshot
    index/...                    index generations, their pointer and leases
                                 (realm.index.generations)
    index/.refresher.lock        one refresher per run (flock on local disks)
    heartbeat.json               the trainer's last step and time
    DONE                         the trainer has finished

(Runs made before the rename keep their snapshots in ``encoders/``, which is read as before; the
reader's saved encoder is ``reader/``, formerly ``encoder/``.)

:class:`RunStore` adds these to :class:`~realm.index.generations.GenerationStore`, and is the
one class callers construct: ``RunStore(run_dir)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from typing import Any, Iterator, Optional

from realm.errors import GenerationError, RunDirError, StoreLockedError
from realm.fsutil import FileLock, write_errors
from realm.index.building import BUILDING, build_step, builds
from realm.index.generations import GEN_PATTERN, LATEST, MANIFEST, GenerationStore, gen_name

logger = logging.getLogger(__name__)

STEP_PATTERN = re.compile(r"^step-(\d{6,})$")

#: the retriever snapshots' folder (``encoders/`` in runs made before it was renamed)
SNAPSHOTS, LEGACY_SNAPSHOTS = "snapshots", "encoders"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


class RunStore(GenerationStore):
    """Versioned artifacts of one run on shared storage (local path or fsspec URL): index
    generations, encoder snapshots, the trainer's heartbeat and DONE marker, the refresher lock.

    Args:
        run_dir: Local directory or fsspec URL of the run.
        storage_options: Passed to fsspec for remote file systems.
    """

    def __init__(self, run_dir: str, storage_options: Optional[dict] = None):
        super().__init__(run_dir, storage_options)
        self._lock: Optional[FileLock] = None  # the refresher lock on local disks
        legacy = self.fs.exists(self.path(LEGACY_SNAPSHOTS)) and \
            not self.fs.exists(self.path(SNAPSHOTS))
        self.snapshots = LEGACY_SNAPSHOTS if legacy else SNAPSHOTS

    # -- trainer liveness -----------------------------------------------------------------

    def write_heartbeat(self, step: int) -> None:
        self.write_json_atomic(self.path("heartbeat.json"),
                               {"step": int(step), "time": time.time(), "pid": os.getpid(),
                                "host": socket.gethostname()})

    def read_heartbeat(self) -> Optional[dict[str, Any]]:
        try:
            return self.read_json(self.path("heartbeat.json"))
        except (ValueError, OSError):
            return None

    def mark_done(self, info: Optional[dict] = None) -> None:
        self.write_json_atomic(self.path("DONE"), {"time": time.time(), **(info or {})})

    def is_done(self) -> bool:
        return self.fs.exists(self.path("DONE"))

    def clear_done(self) -> None:
        """The run goes on (a finished run resumed with more steps): refreshers keep working."""
        if self.is_done():
            self.fs.rm_file(self.path("DONE"))

    # -- encoder snapshots ----------------------------------------------------------------

    def publish_encoder(self, retriever, step: int, metadata: Optional[dict] = None,
                        keep: int = 2) -> str:
        """Save ``retriever`` as ``snapshots/step-S/`` and point ``snapshots/LATEST`` at it.

        Older snapshots beyond the newest ``keep`` are removed afterwards.

        Raises:
            WriteError: the snapshot cannot be written (a full disk...): one line naming it and
                the cause; no partial snapshot is left and ``LATEST`` is unchanged.
        """
        name = step_name(step)
        target = self.path(self.snapshots, name)
        meta = {"step": int(step), **(metadata or {})}
        t0 = time.perf_counter()
        with write_errors(f"publishing encoder snapshot {target}",
                          self.path(self.snapshots) if self.local else None,
                          f"nothing was published ({self.snapshots}/LATEST is unchanged)"):
            if self.fs.exists(self.path(self.snapshots, name, MANIFEST)):
                logger.info("encoder snapshot %s exists; re-pointing LATEST", target)
            elif self.local:
                retriever.save_pretrained(target, metadata=meta, overwrite=True)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    local = os.path.join(tmp, name)
                    retriever.save_pretrained(local, metadata=meta)
                    files = sorted((os.path.relpath(os.path.join(d, f), local)
                                    for d, _, fs in os.walk(local) for f in fs),
                                   key=lambda rel: rel == MANIFEST)  # manifest last
                    for rel in files:
                        self.fs.put_file(os.path.join(local, rel), f"{target}/{rel}")
            self.write_json_atomic(self.path(self.snapshots, LATEST),
                                   {"step": int(step), "path": name, "time": time.time()})
        logger.info("published encoder snapshot %s in %.1fs", name, time.perf_counter() - t0)
        self._gc_encoders(keep)
        return target

    def encoder_steps(self) -> list[int]:
        return self.numbered(self.snapshots, STEP_PATTERN)

    def latest_encoder(self) -> Optional[dict[str, Any]]:
        """``{"step", "path"}`` of the newest published snapshot, or None.

        Raises:
            RunDirError: ``snapshots/LATEST`` names a path the store never writes (``../x``), or
                lacks its step: refused as corrupt, in one line naming the file.
        """
        where = self.path(self.snapshots, LATEST)
        try:
            pointer = self.read_json(where)
        except ValueError:
            return None
        if pointer is None:
            return None
        try:
            step = int(pointer["step"])
        except (KeyError, TypeError, ValueError):
            raise RunDirError(f"{where}: no integer 'step' in {pointer!r}: refused as corrupt; "
                              "delete it and re-run (the trainer publishes a new snapshot)") \
                from None
        if pointer.get("path") != step_name(step):  # only the name the store itself writes
            raise RunDirError(f"{where}: names {pointer.get('path')!r} for step {step}, not "
                              f"{step_name(step)!r}: refused as corrupt; delete it and re-run "
                              "(the trainer publishes a new snapshot)")
        return {"step": step, "path": self.path(self.snapshots, pointer["path"]),
                "time": pointer.get("time")}

    def snapshot_digest(self, path: str) -> str:
        """The sha256 of a snapshot's ``manifest.json`` (written last, with its creation time and
        every file's size): what ties a generation in progress to the snapshot it embeds."""
        import hashlib

        return hashlib.sha256(self.fs.cat_file(f"{path.rstrip('/')}/{MANIFEST}")).hexdigest()

    @contextlib.contextmanager
    def local_encoder(self, path: str) -> Iterator[str]:
        """A local directory holding the snapshot at ``path`` (a download on remote stores)."""
        if self.local:
            yield path
            return
        with tempfile.TemporaryDirectory() as tmp:
            self.fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
            yield tmp

    def _gc_encoders(self, keep: int) -> None:
        steps = self.encoder_steps()
        pointer = self.latest_encoder()
        protect = {pointer["step"]} if pointer else set()
        index = self.read_latest()
        if index is not None:
            protect.add(int(index.get("encoder_step", -1)))
        for step in steps[:-keep] if keep > 0 else []:
            if step not in protect:
                self.remove_dir(self.path(self.snapshots, step_name(step)))

    # -- resume ------------------------------------------------------------------------------

    def discard_after(self, step: int) -> dict[str, list[int]]:
        """Put aside what a run killed after its checkpoint at ``step`` left in the future: encoder
        snapshots of later steps and the generations built from them move to
        ``discarded/<time>/`` (kept for inspection, never reused), and both ``LATEST`` pointers
        fall back to the newest entry that remains. A resumed run then trains on exactly what the
        uninterrupted run had at ``step``.

        Returns:
            ``{"encoders": [steps moved], "generations": [generations moved]}``.
        """
        moved: dict[str, list[int]] = {"encoders": [], "generations": []}
        future_encoders = [s for s in self.encoder_steps() if s > step]
        future_gens = []
        for g in self.generations():
            try:
                encoder_step = int(self.read_generation_manifest(g)["encoder_step"])
            except GenerationError:
                continue  # incomplete: the refresher's orphan cleanup handles it
            if encoder_step > step:
                future_gens.append(g)
        if not future_encoders and not future_gens:
            return moved
        aside = self.path("discarded", f"after-step-{step:06d}-{time.strftime('%Y%m%d-%H%M%S')}")
        for sub, names, key in ((self.snapshots, [step_name(s) for s in future_encoders],
                                 "encoders"),
                                ("index", [gen_name(g) for g in future_gens], "generations")):
            for name in names:
                self.fs.makedirs(f"{aside}/{sub}", exist_ok=True)
                self.fs.mv(self.path(sub, name), f"{aside}/{sub}/{name}", recursive=True)
            moved[key] = future_encoders if key == "encoders" else future_gens
        encoder = self.latest_encoder()
        if encoder is not None and encoder["step"] > step:
            remaining = self.encoder_steps()
            if remaining:
                self.write_json_atomic(self.path(self.snapshots, LATEST), {
                    "step": remaining[-1], "path": step_name(remaining[-1]), "time": time.time()})
            else:
                self.fs.rm_file(self.path(self.snapshots, LATEST))
        latest = self.read_latest()
        if latest is not None and int(latest["generation"]) in future_gens:
            remaining = [g for g in self.generations() if g < int(latest["generation"])]
            if remaining:
                manifest = self.read_generation_manifest(remaining[-1])
                self.write_json_atomic(self.path("index", LATEST), {
                    "generation": remaining[-1], "path": gen_name(remaining[-1]),
                    "encoder_step": int(manifest["encoder_step"]),
                    "corpus_fingerprint": manifest["corpus_fingerprint"], "time": time.time()})
            else:
                self.fs.rm_file(self.path("index", LATEST))
        logger.warning("resuming at step %d: put aside encoder snapshots %s and index generations "
                       "%s of a later step (a run killed after its checkpoint made them) in %s",
                       step, future_encoders, future_gens, aside)
        return moved

    def clean_orphans(self) -> list[str]:
        """Remove what a killed writer left: temp directories, trash, generations past LATEST,
        generations in progress for an encoder step no newer than LATEST's (a generation in
        progress for a newer snapshot is kept: the refresher resumes it).

        Call only while holding the refresher lock.
        """
        latest = self.read_latest()
        current = int(latest["generation"]) if latest else -1
        removed = []
        try:
            paths = self.fs.ls(self.path("index"), detail=False)
        except FileNotFoundError:
            return removed
        for p in paths:
            name = os.path.basename(p.rstrip("/"))
            m = GEN_PATTERN.match(name)
            if (name.startswith(".gen-") or name.startswith(".trash-")
                    or (m and int(m.group(1)) > current)):
                self.remove_dir(p)
                removed.append(name)
        encoder_step = int(latest["encoder_step"]) if latest else -1
        for name in builds(self):  # a generation in progress the committed one has overtaken
            if build_step(name) <= encoder_step:
                self.remove_dir(self.path("index", BUILDING, name))
                removed.append(f"{BUILDING}/{name}")
        if removed:
            logger.warning("removed orphaned index files from a killed writer: %s", removed)
        return removed

    # -- one refresher per run ---------------------------------------------------------------

    def acquire_refresher_lock(self, owner: str, stale_s: float = 120.0) -> None:
        """Become the run's refresher, or raise :class:`StoreLockedError`.

        On local disks an ``flock`` (released by the kernel when the process dies, even by
        ``kill -9``); on object stores a lease object refreshed by :meth:`touch_refresher_lock`
        and taken over when older than ``stale_s``.
        """
        if self.local:
            self._lock = FileLock(self.path("index", ".refresher.lock"), "another refresher")
            self._lock.acquire(owner=owner)
            return
        info = {"owner": owner, "pid": os.getpid(), "host": socket.gethostname(),
                "time": time.time()}
        path = self.path("index", "REFRESHER")
        current = self.read_json(path)
        if current and current.get("owner") != owner and time.time() - current["time"] < stale_s:
            raise StoreLockedError(f"{self.url}: refresher {current['owner']} holds index/REFRESHER")
        self.fs.pipe_file(path, json.dumps(info).encode())
        time.sleep(0.05)
        if (self.read_json(path) or {}).get("owner") != owner:  # lost a simultaneous write
            raise StoreLockedError(f"{self.url}: another refresher took index/REFRESHER")
        self._lock_owner = owner

    def touch_refresher_lock(self) -> None:
        if not self.local and getattr(self, "_lock_owner", None):
            self.fs.pipe_file(self.path("index", "REFRESHER"), json.dumps(
                {"owner": self._lock_owner, "pid": os.getpid(), "host": socket.gethostname(),
                 "time": time.time()}).encode())

    def release_refresher_lock(self) -> None:
        if self._lock is not None and self._lock.held:
            self._lock.release()
        elif getattr(self, "_lock_owner", None):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path("index", "REFRESHER"))
            self._lock_owner = None
