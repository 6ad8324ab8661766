"""One trainer per run directory: the lock taken with the accelerator, the holder named, a dead
holder's lock taken over, every rank of a refused launch stopping together."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from realm.config import TrainConfig
from realm.errors import RunDirError, StoreLockedError
from realm.fsutil import FileLock
from realm.training.accelerator import TRAINER_LOCK, make_accelerator, shutdown

REPO = Path(__file__).resolve().parents[2]

#: Takes the run directory's trainer lock as a stage does, says so, and waits (or exits 0). Each
#: line is one write (the ranks share stdout: print's pieces interleave when it is unbuffered).
TRAINER = textwrap.dedent("""
    import socket, sys, time
    from realm.config import TrainConfig
    from realm.errors import StoreLockedError
    from realm.training.accelerator import HELD, make_accelerator, shutdown
    try:
        accelerator, _ = make_accelerator(TrainConfig(run_dir=sys.argv[1], precision="fp32"), 0)
    except StoreLockedError as e:
        sys.stdout.write(f"refused: {e}\\n"); sys.stdout.flush()
        sys.exit(1)
    sys.stdout.write(f"rank-{accelerator.process_index}-holds-{bool(HELD)}\\n"); sys.stdout.flush()
    time.sleep(float(sys.argv[2]))
    shutdown(accelerator)
""")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_a_second_trainer_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", TRAINER, str(run_dir), "600"],
                              stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "rank-0-holds-True"
        with pytest.raises(StoreLockedError) as refused:
            make_accelerator(TrainConfig(run_dir=str(run_dir), precision="fp32"), 0)
        message = str(refused.value)
        assert "\n" not in message and f"{run_dir}/{TRAINER_LOCK}: another trainer" in message
        assert f"pid {holder.pid} on host " in message and "one trainer per train.run_dir" in message
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding it: the kernel lets go
        holder.wait()
    assert json.loads((run_dir / TRAINER_LOCK).read_text())["pid"] == holder.pid  # left behind
    accelerator, _ = make_accelerator(TrainConfig(run_dir=str(run_dir), precision="fp32"), 0)
    try:
        assert json.loads((run_dir / TRAINER_LOCK).read_text())["pid"] == os.getpid()
    finally:
        shutdown(accelerator)
    lock = FileLock(str(run_dir / TRAINER_LOCK))  # released at shutdown
    lock.acquire()
    lock.release()


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RunDirError, match=f"train.run_dir={tmp_path}/a-file/run: cannot write"):
        make_accelerator(TrainConfig(run_dir=str(tmp_path / "a-file" / "run"),
                                     precision="fp32"), 0)


@pytest.mark.slow
def test_under_accelerate_launch_rank_0_holds_it_and_a_refusal_stops_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(script), str(run_dir)]
    done = subprocess.run(launch + ["0"], capture_output=True, text=True, timeout=240,
                          env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(done.stdout.split()) == ["rank-0-holds-True", "rank-1-holds-False"]
    lock = FileLock(str(run_dir / TRAINER_LOCK))
    lock.acquire()  # a trainer of this process holds the run directory
    try:
        refused = subprocess.run(launch + ["0"], capture_output=True, text=True, timeout=240,
                                 env=_env())
    finally:
        lock.release()
    assert refused.returncode != 0  # every rank stopped (none waits for the other)
    lines = [line for line in refused.stdout.splitlines() if line.startswith("refused:")]
    assert len(lines) == 2 and all(f"pid {os.getpid()} on host" in line for line in lines)
