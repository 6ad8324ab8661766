"""The trainer's supervisor of a refresher child process: spawn, restart (bounded), stop."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

from realm.errors import ConfigError

logger = logging.getLogger(__name__)


#: Variables of a torchrun/accelerate rank that must not leak into a child process.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID",
                 "ACCELERATE_USE_CPU")


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """This process's environment minus the launcher's rank variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(extra or {})
    return env


def _cuda_index(device: str) -> int:
    """``cuda:N`` -> N; ``cuda`` -> 0."""
    return int(device.split(":")[1]) if ":" in device else 0


def check_devices(devices: Sequence[str]) -> None:
    """Raise :class:`realm.errors.ConfigError` naming a device of ``refresh.devices`` that this
    machine does not have (before training starts, not when the refresher first runs)."""
    import torch

    count = torch.cuda.device_count()
    for device in devices:
        if device == "cpu":
            continue
        if _cuda_index(device) >= count:
            raise ConfigError(f"refresh.devices: {device} does not exist (this machine has "
                              f"{count} CUDA device{'s' if count != 1 else ''})")


def placement(devices: Sequence[str]) -> tuple[int, dict[str, str], list[str]]:
    """``refresh.devices`` as ``(processes, environment, config overrides)`` of the spawned
    refresher. Several GPUs: each torchrun process sees its own as ``cuda:LOCAL_RANK``
    (``CUDA_VISIBLE_DEVICES``, read through the trainer's own, if set)."""
    devices = list(devices)
    if not devices:
        return 1, {}, []
    if len(devices) == 1:
        return 1, {}, [f"refresh.device={devices[0]}"]
    if devices[0] == "cpu":
        return len(devices), {"CUDA_VISIBLE_DEVICES": ""}, ["refresh.device=cpu"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = visible.split(",") if visible else None
    chosen = [names[i] if names else str(i) for i in map(_cuda_index, devices)]
    return len(devices), {"CUDA_VISIBLE_DEVICES": ",".join(chosen)}, ["refresh.device=auto"]


class RefresherSupervisor:
    """Runs ``python -m realm.refresh --run-dir RUN_DIR ...`` as a child of the trainer.

    :meth:`check` (cheap; call it every step or so) restarts a child that died, at most
    ``max_restarts`` times, with a growing delay; after that training goes on with the stale index
    and the failure is logged. :meth:`stop` lets the child see ``DONE`` and exit, then ends it.

    Args:
        run_dir: The run directory (local path or fsspec URL).
        args: Further command-line arguments (``--config FILE``, ``key=value`` overrides).
        max_restarts: Restarts allowed after the first start.
        log_path: File that receives the child's stdout and stderr (appended).
        env: Extra environment variables for the child (e.g. ``CUDA_VISIBLE_DEVICES``).
        processes: Refresher processes (several: launched with torchrun, each embedding a
            shard of the corpus; :func:`placement`).
    """

    def __init__(self, run_dir: str, args: Sequence[str] = (), *, max_restarts: int = 3,
                 log_path: Optional[str] = None, env: Optional[dict[str, str]] = None,
                 processes: int = 1):
        self.run_dir = run_dir
        self.args = list(args)
        self.processes = processes
        self.max_restarts = max_restarts
        self.log_path = log_path or os.path.join(run_dir, "refresher.log")
        self.env = env or {}
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = 0
        self.exits: list[int] = []
        self.gave_up = False
        self._next_start = 0.0
        self._cpu_mark: Optional[tuple[int, float, float]] = None  # (pid, cpu s, wall s)

    @property
    def command(self) -> list[str]:
        # --parent-pid: the refresher exits when this process is gone (no orphan holds the run)
        launcher = [sys.executable]
        if self.processes > 1:  # (--standalone: a free rendezvous port on this machine)
            launcher += ["-m", "torch.distributed.run", "--standalone",
                         f"--nproc_per_node={self.processes}"]
        return [*launcher, "-m", "realm.refresh", "--run-dir", self.run_dir,
                "--parent-pid", str(os.getpid()), *self.args]

    def start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        log = open(self.log_path, "ab")
        env = child_env(self.env)  # the trainer rank's launcher variables stay behind
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        logger.info("started refresher (pid %d), log %s", self.proc.pid, self.log_path)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> bool:
        """Restart the refresher if it died (within bounds). Returns whether it is running."""
        if self.proc is None or self.gave_up:
            return self.alive
        rc = self.proc.poll()
        if rc is None:
            return True
        if not self._next_start:
            self.exits.append(rc)
            if self.restarts >= self.max_restarts:
                self.gave_up = True
                logger.error("refresher exited with code %d and was restarted %d times already; "
                             "giving up: training goes on with the index it has (see %s)",
                             rc, self.restarts, self.log_path)
                return False
            delay = min(30.0, 2.0 ** self.restarts)
            self._next_start = time.monotonic() + delay
            logger.warning("refresher exited with code %d; restarting in %.0fs (%d/%d)", rc,
                           delay, self.restarts + 1, self.max_restarts)
        if time.monotonic() >= self._next_start:
            self._next_start = 0.0
            self.restarts += 1
            self.start()
            return True
        return False

    def reset_budget(self) -> None:
        """A generation was committed: the refresher works again, so restarts and backoff start
        over (a run of days is not stuck on a stale index after its third failure)."""
        if self.restarts and not self.gave_up:
            logger.info("refresher committed a generation; restart budget reset (%d used)",
                        self.restarts)
            self.restarts = 0

    def tail(self, lines: int = 10) -> str:
        """The last ``lines`` lines of the refresher's log (for error messages)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode(errors="replace")
        except OSError as e:
            return f"(cannot read {self.log_path}: {e.strerror or e})"
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def failure(self) -> str:
        """Why the refresher is not running, with the last lines of its log."""
        exits = ", ".join(str(rc) for rc in self.exits) or "none"
        return (f"the index refresher died and was restarted {self.restarts} time(s) (exit codes "
                f"{exits}); the last lines of {self.log_path}:\n{self.tail()}")

    def cpu_fraction(self) -> float:
        """Cores the refresher kept busy since the last call (CPU time over wall time; 1.0 is
        one core), 0.0 on the first call for a process or when it is not running."""
        import psutil

        if not self.alive:
            self._cpu_mark = None
            return 0.0
        try:
            proc = psutil.Process(self.proc.pid)
            busy = 0.0
            for p in [proc, *proc.children(recursive=True)]:  # (torchrun: its workers)
                times = p.cpu_times()
                busy += times.user + times.system
        except psutil.Error:  # it exited just now
            return 0.0
        mark = (self.proc.pid, busy, time.monotonic())
        last, self._cpu_mark = self._cpu_mark, mark
        if last is None or last[0] != mark[0] or mark[2] <= last[2]:
            return 0.0
        return (mark[1] - last[1]) / (mark[2] - last[2])

    def stop(self, timeout: float = 60.0) -> Optional[int]:
        """Wait up to ``timeout`` for the child to exit (after ``DONE``), then terminate it."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout) if timeout > 0 else self._terminate()
        except subprocess.TimeoutExpired:
            logger.warning("refresher did not exit within %.0fs; terminating it", timeout)
            return self._terminate()

    def _terminate(self) -> int:
        if self.proc.poll() is not None:
            return self.proc.returncode
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()
