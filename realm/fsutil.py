"""Small file-system helpers for crash-safe artifacts (fsync, content hashes)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from typing import Any, Optional

from realm.errors import StoreLockedError

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


class FileLock:
    """One holder at a time for a directory on a local disk (or NFS with locking): an ``flock``
    on ``path``, held until :meth:`release` or the holder's death. The kernel releases it when
    the process dies (even by ``kill -9``), so a lock file a dead process left is taken over
    as if it were free. The holder's pid, host and start time are written into the file, so
    that a refused process can name it.

    Args:
        path: The lock file (created if missing, never removed).
        what: Who holds such a lock, for messages (``another trainer``).
    """

    def __init__(self, path: str, what: str = "another process"):
        self.path, self.what = path, what
        self.fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self, **info: Any) -> None:
        """Take the lock, recording ``info`` beside pid, host and time.

        Raises:
            StoreLockedError: A live process holds it; the message names its pid and host.
        """
        import fcntl

        if self.fd is not None:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StoreLockedError(f"{self.path}: {self.what} holds it "
                                   f"({describe_holder(holder)})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**info, "pid": os.getpid(), "host": socket.gethostname(),
                                  "time": time.time()}).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def describe_holder(text: str) -> str:
    """``pid 123 on host h since 12:00:01`` of a lock file's JSON (its text if it is not)."""
    try:
        info = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["time"])))
        return f"pid {int(info['pid'])} on host {info['host']} since {since}"
    except (ValueError, KeyError, TypeError):
        return text or "holder unknown"
