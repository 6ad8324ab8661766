"""Writing index generations: the on-disk names, and the commit (files, then ``index/LATEST``).

:class:`GenerationWriter` is the writing half of :class:`realm.index.generations.GenerationStore`
(which adds reading, leases and garbage collection): a generation's files go into a temporary
directory that is fsynced and renamed (local disks) or under the final name with
``manifest.json`` last (object stores), and only then is ``index/LATEST`` replaced.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from typing import Any, Optional, Union

import numpy as np

from realm.version import __version__
from realm.errors import GenerationError
from realm.fsutil import failpoint, fsync_dir
from realm.index.building import GenerationBuild
from realm.index.mips import array_to_bytes
from realm.index.shards import SHARD_BLOCKS, file_info, rows_to_bytes, shard_bounds, shard_file

logger = logging.getLogger(__name__)

GENERATION_KIND = "index_generation"
#: 2: float16 shard files listed in the manifest; 1: one embeddings.npy + block_ids.npy (read).
FORMAT_VERSION = 2
LATEST = "LATEST"
MANIFEST = "manifest.json"
GEN_PATTERN = re.compile(r"^gen-(\d{6,})$")
#: The files a generation directory may hold besides its shards (its manifest lists no others).
GENERATION_FILES = frozenset({"embeddings.npy", "block_ids.npy", "index.faiss"})
#: What every reader of a generation's manifest relies on (one missing: refused as corrupt).
MANIFEST_KEYS = ("generation", "encoder_step", "corpus_fingerprint", "dim", "n_blocks",
                 "index_type", "files")


def gen_name(generation: int) -> str:
    return f"gen-{generation:06d}"




class GenerationWriter:
    """Commits generations (a mix-in of :class:`~realm.index.generations.GenerationStore`,
    whose ``fs``, ``local``, ``path``, ``read_latest``, ``generations``, ``write_json_atomic``
    and ``remove_dir`` it uses)."""

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
        shard_blocks: int = SHARD_BLOCKS,
    ) -> int:
        """Write the next generation from ``embeddings`` in memory and commit it by replacing
        ``index/LATEST`` (the refresher commits its shards with :meth:`commit_build`).

        Args:
            embeddings: ``[n_blocks, dim]`` block embeddings, stored as float16 shards of
                ``shard_blocks`` rows.
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
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or not len(embeddings):
            raise ValueError(f"embeddings must be a non-empty [n, dim] array, got "
                             f"{embeddings.shape}")
        shards = []
        for i, (start, end) in enumerate(shard_bounds(len(embeddings), shard_blocks)):
            data = rows_to_bytes(embeddings[start:end])
            shards.append(({"file": shard_file(i), "start": start, "end": end,
                            **file_info(data)}, data))
        return self.commit_shards(shards, dim=int(embeddings.shape[1]),
                                  encoder_step=encoder_step,
                                  corpus_fingerprint=corpus_fingerprint, factory=factory,
                                  index_bytes=index_bytes, block_ids=block_ids, timings=timings,
                                  extra=extra)

    def commit_build(self, build: GenerationBuild, **kwargs: Any) -> int:
        """Commit a generation whose shards are all done in ``build`` (their files are linked,
        or copied on object stores, into the generation; nothing is re-read), then remove the
        build. Keyword arguments as :meth:`commit_shards`, less ``dim``."""
        shards = [(info, build.path_of(info["file"])) for info in build.shards()]
        generation = self.commit_shards(shards, dim=int(build.plan["dim"]), **kwargs)
        build.remove()
        return generation

    def commit_shards(
        self,
        shards: list[tuple[dict[str, Any], Union[bytes, str]]],
        *,
        dim: int,
        encoder_step: int,
        corpus_fingerprint: str,
        factory: str = "Flat",
        index_bytes: Optional[bytes] = None,
        block_ids: Optional[np.ndarray] = None,
        timings: Optional[dict[str, float]] = None,
        extra: Optional[dict[str, Any]] = None,
    ) -> int:
        """Write the next generation from its shards (``(marker, bytes or a file's path in this
        store)``, in row order) and commit it. See :meth:`commit_generation`."""
        if factory != "Flat" and index_bytes is None:
            raise ValueError(f"index_bytes required for factory {factory!r}")
        n = shards[-1][0]["end"] if shards else 0
        t0 = time.perf_counter()
        latest = self.read_latest()
        generation = max([int(latest["generation"]) if latest else -1, *self.generations()]) + 1
        name = gen_name(generation)
        extras: dict[str, bytes] = {}
        if index_bytes is not None and factory != "Flat":
            extras["index.faiss"] = index_bytes
        if block_ids is not None and not np.array_equal(block_ids, np.arange(n)):
            extras["block_ids.npy"] = array_to_bytes(np.asarray(block_ids, dtype=np.int64))
        files = {info["file"]: {"bytes": info["bytes"], "sha256": info["sha256"]}
                 for info, _ in shards}
        files.update({k: file_info(v) for k, v in extras.items()})
        manifest = {
            "kind": GENERATION_KIND, "format_version": FORMAT_VERSION,
            "generation": generation, "encoder_step": int(encoder_step),
            "corpus_fingerprint": corpus_fingerprint, "dim": int(dim), "n_blocks": int(n),
            "index_type": factory, "embedding_dtype": "float16",
            "shards": [{k: info[k] for k in ("file", "start", "end")} for info, _ in shards],
            "files": files, "timings": dict(timings or {}), "created": time.time(),
            "host": socket.gethostname(), "pid": os.getpid(), "realm_version": __version__,
            **(extra or {}),
        }
        manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode()
        sources = [(info["file"], source) for info, source in shards] + list(extras.items())
        if self.local:
            self._write_generation_local(name, sources, manifest_bytes)
        else:
            self._write_generation_remote(name, sources, manifest_bytes)
        manifest["timings"]["write_s"] = round(time.perf_counter() - t0, 3)
        failpoint("publish")  # generation directory in place, LATEST not yet replaced
        self.write_json_atomic(self.path("index", LATEST), {
            "generation": generation, "path": name, "encoder_step": int(encoder_step),
            "corpus_fingerprint": corpus_fingerprint, "time": time.time()})
        logger.info("committed index generation %d (encoder step %d, %d blocks in %d shards)",
                    generation, encoder_step, n, len(shards))
        return generation

    def _write_generation_local(self, name: str, files: list[tuple[str, Union[bytes, str]]],
                                manifest: bytes) -> None:
        index_dir = self.path("index")
        os.makedirs(index_dir, exist_ok=True)
        tmp = os.path.join(index_dir, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.mkdir(tmp)
        try:
            for fname, data in [*files, (MANIFEST, manifest)]:
                target = os.path.join(tmp, fname)
                if isinstance(data, str):  # a staged shard: a hard link (a copy across devices)
                    try:
                        os.link(data, target)
                        continue
                    except OSError:
                        shutil.copyfile(data, target)
                        data = None
                with open(target, "r+b" if data is None else "wb") as f:
                    if data is not None:
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

    def _write_generation_remote(self, name: str, files: list[tuple[str, Union[bytes, str]]],
                                 manifest: bytes) -> None:
        target = self.path("index", name)
        if self.fs.exists(target + "/" + MANIFEST):
            raise GenerationError(f"{target} was committed by another writer")
        for fname, data in files:
            if isinstance(data, str):
                self.fs.copy(data, f"{target}/{fname}")
            else:
                self.fs.pipe_file(f"{target}/{fname}", data)
        self.fs.pipe_file(f"{target}/{MANIFEST}", manifest)  # last: the directory is complete


__all__ = ["GenerationWriter", "gen_name", "LATEST", "MANIFEST", "GEN_PATTERN"]
