"""Index generations on shared storage: immutable directories committed through one pointer.

Inside a run directory (a local path, or any fsspec URL such as ``s3://bucket/run``)::

    index/gen-000007/            immutable generation: manifest.json, embeddings-00000.f16...
                                 (float16 shards, realm.index.shards), index.faiss (trained
                                 index types only)
    index/building/step-S-KEY/   a generation in progress, shard by shard (realm.index.building)
    index/LATEST                 {"generation": 7, ...}: the committed generation
    index/readers/HOLDER.json    leases: generations that readers hold (kept by GC)

Nothing is written in place. A generation is written under a temporary name (local disks) or
under its final name with ``manifest.json`` last (object stores), and becomes visible only when
the single ``LATEST`` pointer is replaced: temp file, fsync, atomic rename locally; one PUT on an
object store. A crash at any moment leaves ``LATEST`` naming a complete generation.

Readers stream a generation's shards into their index, checking each shard's sha256 as it is
read: a process holding one shard of the index (``index.sharding=ranks``) reads only the shard
files of its rows, and no process holds a second copy of what it keeps. Format-1 generations
(one ``embeddings.npy``) load the same way.

The run directory's other files (encoder snapshots, heartbeat, the refresher lock) are
``realm.refresh.rundir.RunStore``'s, a subclass of :class:`GenerationStore`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from realm.fsutil import pid_alive, write_atomic
from realm.index.commit import (GEN_PATTERN, GENERATION_FILES, GENERATION_KIND, LATEST, MANIFEST,
                                MANIFEST_KEYS, GenerationWriter, gen_name)
from realm.index.mips import MipsIndex, array_from_bytes
from realm.index.shards import (SHARD_PATTERN, Segment, check_file, iter_rows, rank_rows,
                                read_segment_rows, segments_of, stream_rows)
from realm.errors import GenerationError, RunDirError

logger = logging.getLogger(__name__)

@dataclass
class Generation:
    """A loaded, validated index generation.

    The embeddings are not kept in memory by loading (the index holds what search needs):
    :attr:`embeddings` reads this process's rows from the store on first use and keeps them,
    :meth:`read_embeddings` reads them without keeping them.
    """

    generation: int
    manifest: dict[str, Any]
    index: MipsIndex
    loaded_at: float  # time.time() when loading finished
    #: ``(rank, world)`` when this process holds one shard (``index.sharding=ranks``): the
    #: index and :attr:`embeddings` are its rows only (``realm.index.sharded``).
    shard: Optional[tuple[int, int]] = None
    #: ``[start, end)``: the rows of the generation this process holds.
    rows: tuple[int, int] = (0, 0)
    reader: Optional[Callable[[], np.ndarray]] = field(default=None, repr=False)
    kept: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def encoder_step(self) -> int:
        return int(self.manifest["encoder_step"])

    @property
    def embeddings(self) -> Optional[np.ndarray]:
        """``[rows, dim]`` float16 embeddings of the rows held (read once, then kept)."""
        if self.kept is None and self.reader is not None:
            self.kept = self.reader()
        return self.kept

    def read_embeddings(self) -> np.ndarray:
        """The rows held, read (and checked) from the store now; not kept."""
        return self.kept if self.kept is not None else self.reader()

    def search(self, queries: np.ndarray, k: int, exclude=None):
        """The index's top-``k`` (MipsIndex.search)."""
        return self.index.search(queries, k, exclude)

    def embeddings_of(self, block_ids: np.ndarray) -> np.ndarray:
        """Stored float32 embeddings of ``block_ids`` (any shape ``S``) -> ``[*S, dim]``; 0 for -1.

        Assumes the generation indexes blocks ``0..n-1`` in order (what the refresher writes).
        """
        if self.shard is not None:
            raise ValueError("this process holds one shard of the embeddings "
                             "(index.sharding=ranks); their rows are not block ids")
        ids = np.asarray(block_ids)
        out = self.embeddings[np.maximum(ids, 0)].astype(np.float32)  # [*S, dim]
        out[ids < 0] = 0.0
        return out


class GenerationStore(GenerationWriter):
    """Index generations of one run on shared storage (local path or fsspec URL).

    Args:
        run_dir: Local directory or fsspec URL of the run.
        storage_options: Passed to fsspec for remote file systems.
    """

    def __init__(self, run_dir: str, storage_options: Optional[dict] = None):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = str(run_dir)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ValueError, ImportError) as e:  # unknown scheme, or its backend not installed
            scheme = self.url.split("://", 1)[0]
            raise RunDirError(f"run directory {self.url}: no fsspec file system for the scheme "
                             f"{scheme!r} ({e})") from None
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- small files ----------------------------------------------------------------------

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Replace ``path`` with ``data`` so that readers see the old or the new content, whole."""
        if not self.local:
            self.fs.pipe_file(path, data)  # a single PUT: atomic on object stores
            return
        write_atomic(path, [data])

    def write_json_atomic(self, path: str, obj: Any) -> None:
        self.write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())

    def read_json(self, path: str) -> Optional[dict[str, Any]]:
        """The JSON object at ``path``, or None if there is none."""
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return None

    def numbered(self, subdir: str, pattern: re.Pattern) -> list[int]:
        """Sorted numbers of the entries of ``subdir`` whose names match ``pattern``."""
        try:
            paths = self.fs.ls(self.path(subdir), detail=False)
        except FileNotFoundError:
            return []
        names = (os.path.basename(p.rstrip("/")) for p in paths)
        return sorted(int(m.group(1)) for m in map(pattern.match, names) if m)

    # -- index generations ----------------------------------------------------------------

    def read_latest(self) -> Optional[dict[str, Any]]:
        """The committed ``index/LATEST`` pointer (``generation``, ``encoder_step``...), or None.

        Raises:
            RunDirError: the pointer is not JSON, not an object, or lacks an integer
                ``generation``: refused as corrupt, in one line naming the file (the commit
                replaces it atomically, so only a hand or another program writes one such)."""
        where = self.path("index", LATEST)
        try:
            pointer = self.read_json(where)
        except ValueError as e:  # JSON or UTF-8
            raise RunDirError(f"{where}: malformed ({e}): refused as corrupt; delete it and "
                              "re-run (the refresher commits a new generation)") from None
        if pointer is None:
            return None
        if not isinstance(pointer, dict) or not isinstance(pointer.get("generation"), int):
            what = ("lacks 'generation'" if isinstance(pointer, dict) and "generation" not in
                    pointer else f"no integer 'generation' in {pointer!r}")
            raise RunDirError(f"{where}: {what}: refused as corrupt; delete it and re-run (the "
                              "refresher commits a new generation)")
        return pointer

    def generations(self) -> list[int]:
        """Generation numbers with a final-name directory (committed or orphaned)."""
        return self.numbered("index", GEN_PATTERN)

    def read_generation_manifest(self, generation: int) -> dict[str, Any]:
        path = self.path("index", gen_name(generation), MANIFEST)
        try:
            manifest = self.read_json(path)
        except ValueError as e:
            raise GenerationError(f"{path}: unreadable manifest ({e})") from None
        if manifest is None:
            raise GenerationError(f"{path}: missing (generation {generation} is not complete)")
        if not isinstance(manifest, dict):
            raise GenerationError(f"{path}: not a JSON object: refused as corrupt")
        if manifest.get("kind") != GENERATION_KIND:
            raise GenerationError(f"{path}: kind {manifest.get('kind')!r}, not {GENERATION_KIND!r}")
        missing = [key for key in MANIFEST_KEYS if key not in manifest]
        if missing:
            raise GenerationError(f"{path}: lacks {', '.join(map(repr, missing))}: refused as "
                                  "corrupt")
        for fname in manifest["files"]:
            if fname not in GENERATION_FILES and not SHARD_PATTERN.match(fname):
                raise GenerationError(f"{path}: lists {fname!r}, not one of "  # never a path
                                      f"{sorted(GENERATION_FILES)} or a shard: refused as corrupt")
        return manifest

    def _checked_manifest(self, generation: int, corpus_fingerprint: Optional[str],
                          dim: Optional[int]) -> tuple[dict[str, Any], str, list[Segment]]:
        """The manifest, its directory and its row segments, checked against the reader's
        corpus fingerprint and dim."""
        manifest = self.read_generation_manifest(generation)
        where = self.path("index", gen_name(generation))
        if corpus_fingerprint is not None and manifest["corpus_fingerprint"] != corpus_fingerprint:
            raise GenerationError(f"{where}: corpus fingerprint {manifest['corpus_fingerprint']} "
                                  f"!= {corpus_fingerprint} of the corpus in use")
        if dim is not None and int(manifest["dim"]) != dim:
            raise GenerationError(f"{where}: dim {manifest['dim']} != retriever dim {dim}")
        return manifest, where, segments_of(manifest, where)

    def validate_generation(self, generation: int, corpus_fingerprint: Optional[str] = None
                            ) -> Optional[str]:
        """Why ``generation`` is unusable (missing, truncated, corrupted, another corpus), or None
        when it is intact. Every file is read (in chunks) and checked."""
        try:
            manifest, where, segments = self._checked_manifest(generation, corpus_fingerprint,
                                                               None)
            for segment in segments:  # every file hashed in chunks; no row wanted or kept
                for _ in stream_rows(self.fs, f"{where}/{segment.file}", segment,
                                     int(manifest["dim"]), (0, 0)):
                    pass
            for fname, info in manifest["files"].items():
                if fname not in {s.file for s in segments}:
                    check_file(self.fs, f"{where}/{fname}", info)
        except GenerationError as e:
            return str(e)
        return None

    def load_generation(
        self,
        generation: int,
        *,
        corpus_fingerprint: Optional[str] = None,
        dim: Optional[int] = None,
        verify: bool = True,
        gpu: bool = True,
        nprobe: int = 32,
        ef_search: int = 128,
        shard: Optional[tuple[int, int]] = None,
        gpu_device: Optional[int] = None,
    ) -> Generation:
        """Read, check and load generation ``generation`` into an index.

        The shards are streamed into the index in chunks, each shard's sha256 checked as it is
        read (``verify``), so the peak memory is about the index's own size. ``shard=(rank,
        world)`` keeps the rows of :func:`realm.index.shards.rank_rows` only (whole shard files
        where there are enough of them: no other process's rows are read), indexed anew with
        the generation's factory (``index.sharding=ranks``); ``gpu_device`` puts the index on
        that one GPU (where faiss sees GPUs and ``gpu``). A whole-generation load of a trained
        factory reads the stored ``index.faiss`` (and no shard).

        Raises:
            GenerationError: missing or corrupt files (size or sha256 differ from the manifest),
                or a corpus fingerprint / dim other than the reader expects.
        """
        manifest, where, segments = self._checked_manifest(generation, corpus_fingerprint, dim)
        n, d, factory = int(manifest["n_blocks"]), int(manifest["dim"]), manifest["index_type"]
        rows = (0, n) if shard is None else rank_rows(segments, n, *shard)
        if rows[0] >= rows[1]:
            raise GenerationError(f"{where}: {n} blocks cannot be split into {shard[1]} shards")
        block_ids = self._block_ids(manifest, where, rows, verify)
        params = {"nprobe": nprobe, "ef_search": ef_search, "gpu_device": gpu_device, "gpu": gpu}

        def read() -> np.ndarray:
            return read_segment_rows(self.fs, where, segments, d, rows, verify)

        try:
            if shard is None and "index.faiss" in manifest["files"]:
                path = f"{where}/index.faiss"
                check_file(self.fs, path, manifest["files"]["index.faiss"], verify)
                index = MipsIndex.read(path, self.fs, block_ids, factory, **params)
            elif factory == "Flat":  # streamed: the index's storage is filled in place
                index = MipsIndex.from_rows(iter_rows(self.fs, where, segments, d, rows, verify),
                                            rows[1] - rows[0], d, block_ids, **params)
            else:  # a trained factory on this process's rows: trained on (a sample of) them
                index = MipsIndex.build(read(), factory, block_ids, **params)
        except RuntimeError as e:
            raise GenerationError(f"{where}: faiss cannot read the index ({e})") from None
        return Generation(generation=generation, manifest=manifest, index=index,
                          loaded_at=time.time(), shard=shard, rows=rows, reader=read)

    def _block_ids(self, manifest: dict[str, Any], where: str, rows: tuple[int, int],
                   verify: bool) -> np.ndarray:
        """Block ids of rows ``[a, b)``: row numbers, or the stored ``block_ids.npy``."""
        info = manifest["files"].get("block_ids.npy")
        if info is None:
            return np.arange(*rows, dtype=np.int64)
        path = f"{where}/block_ids.npy"
        try:
            blob = self.fs.cat_file(path)
        except FileNotFoundError:
            raise GenerationError(f"{path}: listed in the manifest but missing") from None
        if len(blob) != info["bytes"]:
            raise GenerationError(f"{path}: {len(blob)} bytes, manifest says {info['bytes']} "
                                  "(truncated?)")
        if verify and hashlib.sha256(blob).hexdigest() != info["sha256"]:
            raise GenerationError(f"{path}: sha256 differs from the manifest (corrupted)")
        try:
            ids = array_from_bytes(blob, path)
        except ValueError as e:
            raise GenerationError(str(e)) from None
        if ids.shape != (int(manifest["n_blocks"]),):
            raise GenerationError(f"{path}: shape {ids.shape}, manifest says "
                                  f"({manifest['n_blocks']},)")
        return ids[rows[0]:rows[1]].astype(np.int64)

    # -- leases and garbage collection ------------------------------------------------------

    def acquire_lease(self, holder: str, generation: int, pinned: bool = False) -> None:
        """Record that ``holder`` uses ``generation`` (garbage collection keeps it).

        A reader's lease lapses when not renewed or when its process is gone; a ``pinned`` lease
        (a checkpoint that names the generation) holds until released.
        """
        self.write_json_atomic(self.path("index", "readers", f"{holder}.json"), {
            "generation": int(generation), "pid": os.getpid(), "host": socket.gethostname(),
            "time": time.time(), "pinned": bool(pinned)})

    def leases(self) -> dict[str, dict[str, Any]]:
        """Every readable lease, by holder."""
        out = {}
        try:
            paths = self.fs.ls(self.path("index", "readers"), detail=False)
        except FileNotFoundError:
            return out
        for p in paths:
            if not p.endswith(".json"):
                continue
            try:
                lease = self.read_json(p)
            except (ValueError, OSError):
                continue  # being replaced; the next pass sees it
            if lease is not None:
                out[os.path.basename(p)[: -len(".json")]] = lease
        return out

    def release_lease(self, holder: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path("index", "readers", f"{holder}.json"))

    def leased_generations(self, lease_timeout_s: float = 600.0) -> set[int]:
        """Generations held by live readers (a lease is dead when stale or its local pid died)."""
        held = set()
        host = socket.gethostname()
        for lease in self.leases().values():
            stale = time.time() - float(lease.get("time", 0)) > lease_timeout_s
            dead = lease.get("host") == host and not pid_alive(int(lease.get("pid", -1)))
            if lease.get("pinned") or not (stale or dead):
                held.add(int(lease["generation"]))
        return held

    def gc_generations(self, keep: int = 2, lease_timeout_s: float = 600.0) -> list[int]:
        """Remove committed generations beyond the newest ``keep``, except those readers hold.

        Returns:
            The generations removed.
        """
        latest = self.read_latest()
        if latest is None:
            return []
        current = int(latest["generation"])
        committed = [g for g in self.generations() if g <= current]
        protect = set(committed[-keep:]) | {current} | self.leased_generations(lease_timeout_s)
        removed = []
        for g in committed:
            if g not in protect:
                self.remove_dir(self.path("index", gen_name(g)))
                removed.append(g)
        if removed:
            logger.info("garbage-collected index generations %s", removed)
        return removed

    def remove_dir(self, path: str) -> None:
        """Remove a directory; locally it is first renamed so it never looks half-deleted."""
        if self.local:
            if not os.path.exists(path):
                return
            parent, name = os.path.split(path)
            trash = os.path.join(parent, f".trash-{name.lstrip('.')}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, trash)
            except OSError:
                trash = path
            shutil.rmtree(trash, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)
