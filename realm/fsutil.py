"""Small file-system helpers for crash-safe artifacts (fsync, content hashes)."""

from __future__ import annotations

import hashlib
import os


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so a rename or a new entry in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's content, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for data in iter(lambda: f.read(chunk), b""):
            sha.update(data)
    return sha.hexdigest()
