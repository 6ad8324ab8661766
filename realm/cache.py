"""The one cache key and rank-0 build helper behind every cached stage.

A cached stage (built corpus, truncated or MLM-adapted encoder, ICT / DPR / reader warm start,
first index generation, document embeddings) lives in ``cache_dir`` under ``NAME-KEY``, where the
key is :func:`digest` of everything that changes the result. The main process builds it; the
other ranks wait until its completion marker (written last) appears.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

from realm.fsutil import sha256_file


def digest(obj: Any) -> str:
    """The cache key of ``obj`` (JSON-serialisable): 10 hex digits of its sha256."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def cache_path(cache_dir: str, name: str, key_parts: Any) -> str:
    """``cache_dir/name-KEY`` with ``KEY = digest(key_parts)``."""
    return os.path.join(cache_dir, f"{name}-{digest(key_parts)}")


def content_key(path: str) -> Any:
    """What a cache key holds for an input named by ``path``, so that the same content hits the
    same entry from any directory and changed content misses it: a corpus directory by its
    fingerprint, a file by its sha256 and size, a realm artifact (a retriever, an encoder) by the
    sha256 of its manifest (which lists its files and when it was made); anything else (another
    model directory, a hub name) as its absolute path when it exists, else as given."""
    manifest = os.path.join(path, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            try:
                fingerprint = json.load(f).get("fingerprint")
            except (json.JSONDecodeError, AttributeError):
                fingerprint = None
        if isinstance(fingerprint, str):
            return {"fingerprint": fingerprint}
        return {"manifest_sha256": sha256_file(manifest)}
    if os.path.isfile(path):
        return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    return os.path.abspath(path) if os.path.exists(path) else path


def is_main() -> bool:
    """Whether this is the main process (accelerate/torchrun set RANK; a lone process is)."""
    return os.environ.get("RANK", "0") == "0"


def wait_for(path: str, what: str, timeout: float = 7200.0) -> None:
    """Non-main processes wait here while the main process prepares ``path``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not appear at {path} within {timeout:.0f}s")
        time.sleep(1.0)


def build_once(marker: str, build: Callable[[], Any], what: str) -> None:
    """Run ``build`` on the main process unless ``marker`` (the file a complete build writes
    last) exists; every process returns once ``marker`` is there."""
    if is_main() and not os.path.exists(marker):
        build()
    wait_for(marker, what)
