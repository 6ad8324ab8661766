"""A generation in progress, resumable: shard files committed one by one with done markers.

The refresher embeds a generation shard by shard into ``index/building/step-S-KEY/``::

    plan.json                      what the shards embed: encoder step and snapshot digest,
                                   corpus fingerprint, rows, dim, shard size, precision...
    embeddings-00003.f16           a shard's rows (written under a temp name, fsynced, renamed)
    embeddings-00003.done          its marker, written last: rows, bytes, sha256

``KEY`` is the digest of ``plan.json``, so the directory is tied to one encoder snapshot and one
way of embedding: a refresher restarted for the same snapshot finds the shards already done and
embeds only the missing ones; for any other snapshot (or settings) it starts a new directory and
removes the old one. Once every shard is done, the generation is committed from these files
(:meth:`realm.index.generations.GenerationStore.commit_build`) and the directory is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from typing import Any, Optional

import numpy as np

from realm.cache import digest
from realm.fsutil import fsync_dir
from realm.index.shards import file_info, rows_to_bytes, shard_bounds, shard_file

logger = logging.getLogger(__name__)

BUILDING = "building"
BUILD_PATTERN = re.compile(r"^step-(\d{6,})-([0-9a-f]{10})$")
PLAN = "plan.json"


class GenerationBuild:
    """The shards of one generation being embedded (see the module docstring).

    Args:
        store: The run's generation store (:class:`realm.index.generations.GenerationStore`).
        plan: What the shards embed; must hold ``encoder_step``, ``n_blocks``, ``dim`` and
            ``shard_blocks`` (anything else that changes the embeddings belongs in it too).
    """

    def __init__(self, store, plan: dict[str, Any]):
        self.store = store
        self.plan = dict(plan)
        self.key = digest(self.plan)
        self.name = f"step-{int(plan['encoder_step']):06d}-{self.key}"
        self.dir = store.path("index", BUILDING, self.name)
        self.bounds = shard_bounds(int(plan["n_blocks"]), int(plan["shard_blocks"]))

    def marker(self, shard: int) -> str:
        return f"{self.dir}/{shard_file(shard)[:-len('.f16')]}.done"

    def prepare(self) -> list[int]:
        """Make the directory (removing every other build, and a killed writer's temp files in
        this one). Call on one process, before any shard is written.

        Returns:
            The shards already done (a resumed generation), ascending.
        """
        fs = self.store.fs
        for name in builds(self.store):
            if name != self.name:
                self.store.remove_dir(self.store.path("index", BUILDING, name))
        fs.makedirs(self.dir, exist_ok=True)
        if self.store.read_json(f"{self.dir}/{PLAN}") != self.plan:
            self.store.write_json_atomic(f"{self.dir}/{PLAN}", self.plan)
        if self.store.local:
            for name in os.listdir(self.dir):
                if name.startswith("."):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(self.dir, name))
        return self.done()

    def done(self) -> list[int]:
        """Shards whose marker and file agree (a file without a marker is not done)."""
        try:
            sizes = {os.path.basename(entry["name"].rstrip("/")): entry.get("size")
                     for entry in self.store.fs.ls(self.dir, detail=True)}
        except FileNotFoundError:
            return []
        out = []
        for i, (start, end) in enumerate(self.bounds):
            if shard_file(i)[:-len(".f16")] + ".done" not in sizes:
                continue
            try:
                info = self.store.read_json(self.marker(i))
            except ValueError:
                continue
            if (info and info.get("start") == start and info.get("end") == end
                    and sizes.get(shard_file(i)) == info.get("bytes")):
                out.append(i)
        return out

    def missing(self) -> list[int]:
        done = set(self.done())
        return [i for i in range(len(self.bounds)) if i not in done]

    def write_shard(self, shard: int, rows: np.ndarray) -> dict[str, Any]:
        """Commit shard ``shard``'s rows (``[end - start, dim]``): the file (temp name, fsync,
        rename), then its marker. Returns the marker."""
        start, end = self.bounds[shard]
        if rows.shape != (end - start, int(self.plan["dim"])):
            raise ValueError(f"shard {shard} holds rows [{start}, {end}) of dim "
                             f"{self.plan['dim']}, got an array of shape {rows.shape}")
        data = rows_to_bytes(rows)
        name = shard_file(shard)
        info = {"shard": shard, "file": name, "start": start, "end": end, **file_info(data)}
        if self.store.local:
            tmp = os.path.join(self.dir, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, os.path.join(self.dir, name))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            fsync_dir(self.dir)
        else:
            self.store.fs.pipe_file(f"{self.dir}/{name}", data)
        self.store.write_json_atomic(self.marker(shard), info)
        return info

    def shards(self) -> list[dict[str, Any]]:
        """Every shard's marker, in row order.

        Raises:
            ValueError: a shard is not done yet.
        """
        missing = self.missing()
        if missing:
            raise ValueError(f"{self.dir}: shards {missing} of {len(self.bounds)} are not done")
        return [self.store.read_json(self.marker(i)) for i in range(len(self.bounds))]

    def path_of(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def remove(self) -> None:
        self.store.remove_dir(self.dir)


def builds(store) -> list[str]:
    """Names of the generations in progress under ``index/building/``."""
    try:
        paths = store.fs.ls(store.path("index", BUILDING), detail=False)
    except FileNotFoundError:
        return []
    names = (os.path.basename(p.rstrip("/")) for p in paths)
    return sorted(n for n in names if BUILD_PATTERN.match(n))


def build_step(name: str) -> Optional[int]:
    """The encoder step of a build directory's name, or None."""
    m = BUILD_PATTERN.match(name)
    return int(m.group(1)) if m else None


__all__ = ["GenerationBuild", "BUILDING", "builds", "build_step"]
