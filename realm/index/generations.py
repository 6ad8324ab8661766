"""Index generations on shared storage: immutable directories committed through one pointer.

Inside a run directory (a local path, or any fsspec URL such as ``s3://bucket/run``)::

    index/gen-000007/            immutable generation: manifest.json, embeddings.npy (float16),
                                 block_ids.npy, index.faiss (trained index types only)
    index/LATEST                 {"generation": 7, ...}: the committed generation
    index/readers/HOLDER.json    leases: generations that readers hold (kept by GC)

Nothing is written in place. A generation is written under a temporary name (local disks) or
under its final name with ``manifest.json`` last (object stores), and becomes visible only when
the single ``LATEST`` pointer is replaced: temp file, fsync, atomic rename locally; one PUT on an
object store. A crash at any moment leaves ``LATEST`` naming a complete generation.

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
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from realm.version import __version__
from realm.fsutil import failpoint, fsync_dir, pid_alive
from realm.index.mips import MipsIndex, array_from_bytes, array_to_bytes
from realm.index.sharded import shard_range
from realm.errors import GenerationError, RunDirError

logger = logging.getLogger(__name__)

GENERATION_KIND = "index_generation"
FORMAT_VERSION = 1
LATEST = "LATEST"
MANIFEST = "manifest.json"
GEN_PATTERN = re.compile(r"^gen-(\d{6,})$")
#: The files a generation directory holds (its manifest lists no others).
GENERATION_FILES = frozenset({"embeddings.npy", "block_ids.npy", "index.faiss"})
#: What every reader of a generation's manifest relies on (one missing: refused as corrupt).
MANIFEST_KEYS = ("generation", "encoder_step", "corpus_fingerprint", "dim", "n_blocks",
                 "index_type", "files")


def gen_name(generation: int) -> str:
    return f"gen-{generation:06d}"


@dataclass
class Generation:
    """A loaded, validated index generation."""

    generation: int
    manifest: dict[str, Any]
    index: MipsIndex
    loaded_at: float  # time.time() when loading finished
    embeddings: Optional[np.ndarray] = None  # [n_blocks, dim] float16, rows as in block_ids
    #: ``(rank, world)`` when this process holds one shard (``index.sharding=ranks``): the
    #: index and ``embeddings`` are its rows only (``realm.index.sharded``).
    shard: Optional[tuple[int, int]] = None

    @property
    def encoder_step(self) -> int:
        return int(self.manifest["encoder_step"])

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


class GenerationStore:
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
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-"
                                      f"{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(directory)

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
        """The committed ``index/LATEST`` pointer (``generation``, ``encoder_step``...), or None."""
        return self.read_json(self.path("index", LATEST))

    def generations(self) -> list[int]:
        """Generation numbers with a final-name directory (committed or orphaned)."""
        return self.numbered("index", GEN_PATTERN)

    def commit_generation(
        self,
        embeddings: np.ndarray,
        *,
        encoder_step: int,
        corpus_fingerprint: str,
        factory: str = "Flat",
        index_bytes: Optional[bytes] = None,
        block_ids: Optional[np.ndarray] = None,
        timings: Optional[dict[str, float]] = None,
        extra: Optional[dict[str, Any]] = None,
    ) -> int:
        """Write the next generation and commit it by replacing ``index/LATEST``.

        Args:
            embeddings: ``[n_blocks, dim]`` block embeddings, stored as float16.
            encoder_step: Training step of the encoder snapshot that made them.
            corpus_fingerprint: Fingerprint of the block store they index.
            factory: faiss factory string of the index.
            index_bytes: The serialized faiss index; required unless ``factory == "Flat"``
                (an exact index is rebuilt from the embeddings at load).
            block_ids: Block id of each row (default: row numbers).
            timings: Seconds spent embedding, building... (recorded in the manifest).
            extra: More manifest fields (throughput, refresher id...).

        Returns:
            The committed generation number.

        Raises:
            GenerationError: another writer committed this generation number first.
            OSError: the target cannot be written (nothing is committed).
        """
        if factory != "Flat" and index_bytes is None:
            raise ValueError(f"index_bytes required for factory {factory!r}")
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float16)
        if block_ids is None:
            block_ids = np.arange(len(embeddings), dtype=np.int64)
        t0 = time.perf_counter()
        latest = self.read_latest()
        generation = max([int(latest["generation"]) if latest else -1, *self.generations()]) + 1
        name = gen_name(generation)
        files = {"embeddings.npy": array_to_bytes(embeddings),
                 "block_ids.npy": array_to_bytes(np.asarray(block_ids, dtype=np.int64))}
        if index_bytes is not None and factory != "Flat":
            files["index.faiss"] = index_bytes
        manifest = {
            "kind": GENERATION_KIND, "format_version": FORMAT_VERSION,
            "generation": generation, "encoder_step": int(encoder_step),
            "corpus_fingerprint": corpus_fingerprint, "dim": int(embeddings.shape[1]),
            "n_blocks": int(len(embeddings)), "index_type": factory,
            "embedding_dtype": "float16",
            "files": {k: {"bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()}
                      for k, v in files.items()},
            "timings": dict(timings or {}), "created": time.time(),
            "host": socket.gethostname(), "pid": os.getpid(), "realm_version": __version__,
            **(extra or {}),
        }
        manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode()
        if self.local:
            self._write_generation_local(name, files, manifest_bytes)
        else:
            self._write_generation_remote(name, files, manifest_bytes)
        manifest["timings"]["write_s"] = round(time.perf_counter() - t0, 3)
        failpoint("publish")  # generation directory in place, LATEST not yet replaced
        self.write_json_atomic(self.path("index", LATEST), {
            "generation": generation, "path": name, "encoder_step": int(encoder_step),
            "corpus_fingerprint": corpus_fingerprint, "time": time.time()})
        logger.info("committed index generation %d (encoder step %d, %d blocks)", generation,
                    encoder_step, len(embeddings))
        return generation

    def _write_generation_local(self, name: str, files: dict[str, bytes], manifest: bytes) -> None:
        index_dir = self.path("index")
        os.makedirs(index_dir, exist_ok=True)
        tmp = os.path.join(index_dir, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.mkdir(tmp)
        try:
            for fname, data in [*files.items(), (MANIFEST, manifest)]:
                with open(os.path.join(tmp, fname), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            failpoint("write")  # files written, not yet renamed
            try:
                os.rename(tmp, os.path.join(index_dir, name))  # fails if the name is taken
            except OSError as e:
                if os.path.exists(os.path.join(index_dir, name)):
                    raise GenerationError(f"{index_dir}/{name} was committed by another writer") \
                        from e
                raise
            fsync_dir(index_dir)
        except BaseException:
            self.remove_dir(tmp)
            raise

    def _write_generation_remote(self, name: str, files: dict[str, bytes], manifest: bytes) -> None:
        target = self.path("index", name)
        if self.fs.exists(target + "/" + MANIFEST):
            raise GenerationError(f"{target} was committed by another writer")
        for fname, data in files.items():
            self.fs.pipe_file(f"{target}/{fname}", data)
        self.fs.pipe_file(f"{target}/{MANIFEST}", manifest)  # last: the directory is complete

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
        return manifest

    def read_generation_files(self, generation: int, *, corpus_fingerprint: Optional[str] = None,
                              dim: Optional[int] = None, verify: bool = True,
                              ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The manifest and file contents of ``generation``, checked against the manifest (names,
        sizes, sha256 with ``verify``), the corpus fingerprint and dim. Raises
        :class:`GenerationError`."""
        manifest = self.read_generation_manifest(generation)
        where = self.path("index", gen_name(generation))
        if corpus_fingerprint is not None and manifest["corpus_fingerprint"] != corpus_fingerprint:
            raise GenerationError(f"{where}: corpus fingerprint {manifest['corpus_fingerprint']} "
                                  f"!= {corpus_fingerprint} of the corpus in use")
        if dim is not None and int(manifest["dim"]) != dim:
            raise GenerationError(f"{where}: dim {manifest['dim']} != retriever dim {dim}")
        data = {}
        for fname, info in manifest["files"].items():
            if fname not in GENERATION_FILES:  # never a path the store did not write
                raise GenerationError(f"{where}/{MANIFEST}: lists {fname!r}, not one of "
                                      f"{sorted(GENERATION_FILES)}: refused as corrupt")
            try:
                blob = self.fs.cat_file(f"{where}/{fname}")
            except FileNotFoundError:
                raise GenerationError(f"{where}/{fname}: listed in the manifest but missing") \
                    from None
            if len(blob) != info["bytes"]:
                raise GenerationError(f"{where}/{fname}: {len(blob)} bytes, manifest says "
                                      f"{info['bytes']} (truncated?)")
            if verify and hashlib.sha256(blob).hexdigest() != info["sha256"]:
                raise GenerationError(f"{where}/{fname}: sha256 differs from the manifest "
                                      "(corrupted)")
            data[fname] = blob
        return manifest, data

    def validate_generation(self, generation: int, corpus_fingerprint: Optional[str] = None
                            ) -> Optional[str]:
        """Why ``generation`` is unusable (missing, truncated, corrupted, another corpus), or None
        when it is intact."""
        try:
            self.read_generation_files(generation, corpus_fingerprint=corpus_fingerprint)
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
        """Read, check and load generation ``generation`` into memory.

        ``shard=(rank, world)`` keeps rows ``shard_range(n_blocks, rank, world)`` only, indexed
        anew with the generation's factory (``index.sharding=ranks``); ``gpu_device`` puts the
        index on that one GPU (where faiss sees GPUs and ``gpu``).

        Raises:
            GenerationError: missing or corrupt files (size or sha256 differ from the manifest),
                or a corpus fingerprint / dim other than the reader expects.
        """
        manifest, data = self.read_generation_files(
            generation, corpus_fingerprint=corpus_fingerprint, dim=dim, verify=verify)
        where = self.path("index", gen_name(generation))
        try:
            embeddings = array_from_bytes(data["embeddings.npy"], f"{where}/embeddings.npy")
            block_ids = array_from_bytes(data["block_ids.npy"], f"{where}/block_ids.npy")
        except ValueError as e:
            raise GenerationError(str(e)) from None
        if embeddings.shape != (manifest["n_blocks"], manifest["dim"]):
            raise GenerationError(f"{where}/embeddings.npy: shape {embeddings.shape}, manifest "
                                  f"says ({manifest['n_blocks']}, {manifest['dim']})")
        factory = manifest["index_type"]
        params = {"nprobe": nprobe, "ef_search": ef_search, "gpu_device": gpu_device}
        if shard is not None:
            start, end = shard_range(len(embeddings), *shard)
            embeddings, block_ids = embeddings[start:end].copy(), block_ids[start:end].copy()
            data.pop("index.faiss", None)  # the whole generation's: each shard builds its own
            if not len(embeddings):
                raise GenerationError(f"{where}: {manifest['n_blocks']} blocks cannot be split "
                                      f"into {shard[1]} shards")
        try:
            if "index.faiss" in data:
                index = MipsIndex.from_bytes(data["index.faiss"], block_ids, factory, gpu=gpu,
                                             **params)
            else:
                index = MipsIndex.build(embeddings, factory, block_ids, gpu=gpu, **params)
        except RuntimeError as e:
            raise GenerationError(f"{where}: faiss cannot read the index ({e})") from None
        return Generation(generation=generation, manifest=manifest, index=index,
                          loaded_at=time.time(), embeddings=embeddings, shard=shard)

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
