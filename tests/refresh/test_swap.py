"""The stall-free swap: on the training thread a swap only replaces a reference; the watcher
thread moves the leases, frees the old generation, and loads at a lower CPU priority."""

import os
import sys
import threading
import time
import weakref

import numpy as np
import pytest

from realm.refresh.rundir import RunStore
from realm.refresh.watcher import IndexWatcher


def _wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_swap_writes_nothing_on_the_training_thread(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 8)).astype(np.float16)
    store.commit_generation(emb, encoder_step=0, corpus_fingerprint="fp")
    writes: list[tuple[str, str, int]] = []
    for name in ("acquire_lease", "release_lease"):
        real = getattr(store, name)

        def recording(holder, *args, _real=real, _name=name, **kw):
            writes.append((threading.current_thread().name, _name,
                           args[0] if args else -1))
            return _real(holder, *args, **kw)

        setattr(store, name, recording)
    # a long poll interval: only the swap's wake-up makes the watcher write the leases soon
    watcher = IndexWatcher(store, corpus_fingerprint="fp", dim=8, poll_s=30).start()
    try:
        old = watcher.wait_for_first(timeout=10)
        gone = weakref.ref(old)
        del old
        store.commit_generation(emb * 2, encoder_step=5, corpus_fingerprint="fp")
        watcher.poll_once()  # (what the thread does on its next poll; here, now)
        assert watcher.pending_generation == 1
        # while it waits to be swapped in, garbage collection keeps both generations
        store.gc_generations(keep=1)
        assert store.generations() == [0, 1]

        before = len(writes)
        on_training_thread = threading.current_thread().name
        assert watcher.maybe_swap() and watcher.current.generation == 1
        assert [w for w in writes[before:] if w[0] == on_training_thread] == []
        assert watcher.last_swap_s < 0.01

        _wait_for(lambda: "-pending" not in "".join(store.leases()) and gone() is None)
        leases = store.leases()
        assert [leases[h]["generation"] for h in leases] == [1]  # moved by the watcher thread
        assert {w[0] for w in writes[before:]} == {"index-watcher"}
        store.gc_generations(keep=1)
        assert store.generations() == [1]
    finally:
        watcher.stop()
    assert store.leases() == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_watcher_thread_loads_at_a_lower_priority(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    watcher = IndexWatcher(store, corpus_fingerprint="fp", dim=8, poll_s=0.05).start()
    try:
        tid = watcher._thread.native_id
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        _wait_for(lambda: os.getpriority(os.PRIO_PROCESS, tid) > mine)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # untouched
    finally:
        watcher.stop()


def test_refresher_placement_on_devices(monkeypatch):
    """``refresh.devices``: one device is a config override; several, torchrun processes that
    each see their own GPU (through the trainer's own CUDA_VISIBLE_DEVICES)."""
    import torch

    from realm.errors import ConfigError
    from realm.config import load_config
    from realm.refresh.supervisor import RefresherSupervisor, check_devices, placement

    assert placement([]) == (1, {}, [])
    assert placement(["cuda:1"]) == (1, {}, ["refresh.device=cuda:1"])
    assert placement(["cpu", "cpu"]) == (2, {"CUDA_VISIBLE_DEVICES": ""}, ["refresh.device=cpu"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert placement(["cuda:2", "cuda:3"]) == (2, {"CUDA_VISIBLE_DEVICES": "6,7"},
                                               ["refresh.device=auto"])
    command = RefresherSupervisor("run", ["--no-progress"], processes=2).command
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[5:7] == ["-m", "realm.refresh"]

    check_devices(["cpu", "cpu"])
    missing = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"refresh.devices: cuda:{missing} does not exist"):
        check_devices([f"cuda:{missing}"])
    with pytest.raises(ConfigError, match="'gpu0' is not a device"):
        load_config(None, ["refresh.devices=[gpu0]"])
    with pytest.raises(ConfigError, match="all cpu or all cuda"):
        load_config(None, ["refresh.devices=[cpu, cuda:0]"])
