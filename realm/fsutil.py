"""Small file-system helpers for crash-safe artifacts (fsync, content hashes, locks) and for
saying in one line why a write failed (:func:`write_errors`) or cannot succeed
(:func:`output_problem`)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from typing import Any, Iterable, Iterator, Optional

from realm.errors import StoreLockedError, WriteError

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


# ---------------------------------------------------------------------------------------------
# Failed writes, in one line


def existing_parent(path: str) -> str:
    """``path`` if it exists, else the nearest directory above it that does."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def disk_problem(path: str, low_bytes: int = 64 << 20) -> Optional[str]:
    """Why files cannot be written under ``path`` ("no space left on the device" with what is
    free, not writable, or what a 1 MiB probe write fails with), else None."""
    path = existing_parent(path)
    try:
        usage = shutil.disk_usage(path)
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    if usage.free < low_bytes:
        return f"no space left on the device ({usage.free >> 20} MiB free under {path})"
    if not os.access(path, os.W_OK):
        return f"permission denied: {path} is not writable"
    probe = os.path.join(path, f".write-probe-{os.getpid()}")
    try:  # torch says only "iostream error": what a plain write of 1 MiB says is clearer
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"{e.strerror or e} writing under {path}"
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    return None


def write_failure(path: Optional[str], err: BaseException) -> str:
    """Why a write under ``path`` failed, in words: a full disk (``ENOSPC``, a quota) says so
    with what is free; else what :func:`disk_problem` finds, else ``err``'s own words. ``path``
    None (an object store): ``err``'s words only."""
    words = (err.strerror if isinstance(err, OSError) and err.strerror else str(err)) or \
        type(err).__name__
    if path is None:
        return words
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = existing_parent(path)
        try:
            free = f"{shutil.disk_usage(where).free >> 20} MiB free under {where}"
        except OSError:
            free = where
        return f"no space left on the device ({free})"
    return disk_problem(path) or words


@contextlib.contextmanager
def write_errors(what: str, where: Optional[str], kept: str = "") -> Iterator[None]:
    """Writes inside that fail end in one :class:`WriteError` line: ``"{what} failed: {cause};
    {kept}"`` (the cause from :func:`write_failure` under ``where``; None for an object store).

    Every ``OSError`` is such a failure; another exception only when the disk under ``where``
    shows a problem (torch and safetensors report a full disk in their own words), else it
    propagates as it is. The original error is the new one's ``__cause__`` (``--debug``).
    """
    tail = f"; {kept}" if kept else ""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(f"{what} failed: {write_failure(where, e)}{tail}") from e
    except Exception as e:
        problem = disk_problem(where) if where is not None else None
        if problem is None:
            raise
        raise WriteError(f"{what} failed: {problem}{tail}") from e


def write_atomic(path: str, chunks: Iterable[bytes]) -> None:
    """Replace the local file ``path`` with ``chunks`` so that readers see the old or the new
    content, whole: a hidden temporary name beside it, fsync, rename, fsync of the directory.
    A failure removes the temporary file and leaves ``path`` as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-"
                                  f"{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def write_lines_atomic(path: str, lines: Iterable[str], what: str) -> None:
    """``lines`` (each ending in a newline) written to ``path`` whole or not at all
    (:func:`write_atomic`). A failed write (a full disk) ends in one :class:`WriteError` line:
    ``"writing {what} {path} failed: {cause}; {path} is unchanged"``."""
    path = os.path.abspath(path)
    with write_errors(f"writing {what} {path}", os.path.dirname(path), f"{path} is unchanged"):
        write_atomic(path, (line.encode("utf-8") for line in lines))


def output_problem(path: str, directory: bool = False) -> Optional[str]:
    """Why ``path`` cannot be made as an output file (a ``directory`` with ``directory``), or
    None: a regular file stands where a directory must be, the path is of the other kind, or
    the nearest existing directory above it is not writable. For command lines to check their
    output flags before any work."""
    path = os.path.abspath(path)
    if os.path.isdir(path) and not directory:
        return f"{path} is a directory, not a file"
    if os.path.exists(path) and directory and not os.path.isdir(path):
        return f"{path} is a regular file, not a directory"
    parent = existing_parent(os.path.dirname(path))
    if not os.path.isdir(parent):
        return f"{parent} is a regular file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None
