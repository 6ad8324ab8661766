"""Small file-system helpers for crash-safe artifacts (fsync, content hashes)."""

from __future__ import annotations

import hashlib
import logging
import os
import time

logger = logging.getLogger(__name__)


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


def failpoint(name: str) -> None:
    """Fault injection for the crash tests: pause at ``name`` when ``REALM_FAILPOINT=name``.

    The process logs that it reached the point and sleeps ``REALM_FAILPOINT_S`` seconds (default
    60), so a test can ``kill -9`` it exactly there. Does nothing unless the variable is set.
    """
    if os.environ.get("REALM_FAILPOINT") == name:
        logger.warning("failpoint %s reached (pid %d)", name, os.getpid())
        for handler in logging.getLogger().handlers:
            handler.flush()
        time.sleep(float(os.environ.get("REALM_FAILPOINT_S", "60")))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def best_effort(fn, *args, what: str, attempts: int = 3, delay_s: float = 0.2, **kwargs):
    """``fn(*args, **kwargs)``, retried ``attempts`` times on ``OSError``; then a warning and
    None. For writes a run can live without for a while (heartbeat, leases): a full disk or a
    flaky mount must not end training over them."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            if attempt == attempts:
                logger.warning("%s failed %d times (%s); training goes on", what, attempts, e)
                return None
            time.sleep(delay_s * attempt)
