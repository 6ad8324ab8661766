"""Faults the hardening audit found (issue 21): a dead refresher before generation 0, a corrupt
newest generation, an orphaned refresher, a restart budget that never resets, a stale index."""

import itertools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import psutil
import pytest

from realm.data.store import BlockStore
from realm.refresh.rundir import RunStore
from realm.modeling.retriever import Retriever
from realm.refresh.hook import RefreshHook
from realm.refresh.refresher import Refresher, RefreshSettings
from realm.errors import RefresherFailed
from realm.refresh.supervisor import RefresherSupervisor
from realm.refresh.watcher import IndexWatcher

from .conftest import child_env, publish, refresher_cmd, run, summary, wait_for


def _hook(run_dir, retriever_dir, corpus_fp, supervisor=None, **kw):
    retriever = Retriever.from_pretrained(retriever_dir)
    return RefreshHook(RunStore(str(run_dir)), retriever, lambda m: m, corpus_fingerprint=corpus_fp,
                       dim=retriever.dim, every_steps=3, is_main=True, supervisor=supervisor,
                       poll_s=0.1, **kw)


@pytest.mark.slow
def test_a_dead_refresher_ends_the_wait_for_generation_0_quoting_its_log(
        tiny_retriever, corpus_fp, tmp_path, monkeypatch):
    for key, value in child_env().items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    supervisor = RefresherSupervisor(str(run_dir), ["--corpus", str(tmp_path / "no-such-corpus"),
                                                    "--no-progress"], max_restarts=1)
    hook = _hook(run_dir, tiny_retriever, corpus_fp, supervisor, first_timeout_s=600)
    t0 = time.monotonic()
    with pytest.raises(RefresherFailed) as err:
        hook.start(0)
    assert time.monotonic() - t0 < 120  # not the 600 s timeout
    message = str(err.value)
    assert "restarted 1 time" in message and "exit codes 1, 1" in message
    assert "no-such-corpus" in message  # the refresher's own error, quoted from its log
    # the supervisor gave up after its bounded restarts and says so
    assert supervisor.gave_up and supervisor.restarts == 1 and supervisor.exits == [1, 1]
    assert not supervisor.check()
    hook.close(finished=False)
    assert not supervisor.alive


def test_the_wait_for_generation_0_is_the_configured_timeout(tiny_retriever, corpus_fp, tmp_path):
    hook = _hook(tmp_path / "run", tiny_retriever, corpus_fp, first_timeout_s=1.5)
    t0 = time.monotonic()
    with pytest.raises(RefresherFailed, match="first_generation_timeout_s=1.5"):
        hook.start(0)
    assert 1.0 < time.monotonic() - t0 < 30
    hook.close(finished=False)


def _corrupt(store, generation):
    path = store.path("index", f"gen-{generation:06d}", "embeddings-00000.f16")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-8] + b"\x00" * 8)


@pytest.mark.slow
def test_a_corrupt_newest_generation_falls_back_and_is_rebuilt(leads_corpus, tiny_retriever,
                                                              corpus_fp, tmp_path):
    run_dir = tmp_path / "run"
    done = run(refresher_cmd(run_dir, leads_corpus, "--retriever", tiny_retriever, "--once"))
    assert done.returncode == 0, done.stderr[-3000:]
    store = RunStore(str(run_dir))
    publish(store, tiny_retriever, step=10, seed=1)
    done = run(refresher_cmd(run_dir, leads_corpus, "--once"))
    assert summary(done)["generations"] == [1]
    _corrupt(store, 1)  # killed runs, then the newest generation damaged on disk

    # the trainer starts on the intact older generation, not on nothing
    watcher = IndexWatcher(store, corpus_fingerprint=corpus_fp, dim=16, poll_s=0.1)
    assert watcher.wait_for_first(timeout=10).generation == 0
    assert "sha256" in watcher.rejected[1]

    # the refresher does not take the corrupt generation for "up to date": it re-embeds
    refresher = Refresher(store, BlockStore(leads_corpus), RefreshSettings())
    assert refresher.pending_snapshot()["step"] == 10
    done = run(refresher_cmd(run_dir, leads_corpus, "--once"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(done)["generations"] == [2]
    assert "does not validate" in done.stderr
    assert watcher.poll_once() == 2 and watcher.maybe_swap()
    assert watcher.current.encoder_step == 10
    assert Refresher(store, BlockStore(leads_corpus), RefreshSettings()).pending_snapshot() is None


PARENT = textwrap.dedent("""
    import sys, time
    from realm.refresh.supervisor import RefresherSupervisor
    supervisor = RefresherSupervisor(sys.argv[1], sys.argv[2:])
    supervisor.start()
    print(supervisor.proc.pid, flush=True)
    time.sleep(600)
""")


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_a_refresher_whose_trainer_is_killed_exits_and_frees_the_run(leads_corpus,
                                                                     tiny_retriever, tmp_path):
    run_dir = tmp_path / "run"
    store = RunStore(str(run_dir))
    publish(store, tiny_retriever, step=0, seed=0)
    args = refresher_cmd(run_dir, leads_corpus)[4:]  # --corpus ... (no --run-dir)
    trainer = subprocess.Popen([sys.executable, "-c", PARENT, str(run_dir), *args],
                               stdout=subprocess.PIPE, text=True, env=child_env())
    refresher_pid = int(trainer.stdout.readline())
    wait_for(store.read_latest, timeout=120, what="generation 0")
    assert not _gone(refresher_pid)
    os.kill(trainer.pid, signal.SIGKILL)  # the trainer dies; nobody stops its refresher
    trainer.wait()
    wait_for(lambda: _gone(refresher_pid), timeout=30, what="the orphaned refresher to exit")
    log = open(run_dir / "refresher.log").read()
    # between generations its loop notices; while embedding, its parent-watch thread does
    assert '"reason": "trainer gone"' in log or "is gone; the refresher exits" in log
    # the rerun's refresher gets the run (no "another refresher holds" exit 3)
    publish(store, tiny_retriever, step=5, seed=1)
    done = run(refresher_cmd(run_dir, leads_corpus, "--once"))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert summary(done)["generations"] == [1]


class Dying(RefresherSupervisor):
    """A supervised child that exits at once with code 7."""

    @property
    def command(self):
        return [sys.executable, "-c", "raise SystemExit(7)"]


def test_the_restart_budget_starts_over_when_the_hook_swaps_in_a_generation(tmp_path,
                                                                           monkeypatch):
    from realm.refresh import supervisor as module

    clock = itertools.count(0, 100)  # every look at the clock: the backoff has passed
    monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    supervisor = Dying(str(tmp_path / "run"), max_restarts=1)
    supervisor.start()
    supervisor.proc.wait()
    supervisor.check()  # the backoff has passed: restart 1 of 1
    assert supervisor.restarts == 1
    # the restarted refresher committed a generation: the trainer's hook swaps it in
    hook = RefreshHook(RunStore(str(tmp_path / "run")), None, lambda m: m, corpus_fingerprint="f",
                       dim=8, every_steps=2, is_main=True, supervisor=supervisor)
    hook.started_at = 0  # (started: no first-generation wait)
    hook.watcher.maybe_swap = lambda: True
    hook.watcher.current = types.SimpleNamespace(generation=1, encoder_step=0)
    hook.before_step(1)
    assert supervisor.restarts == 0 and hook.generations_used == {1}
    supervisor.proc.wait()
    supervisor.check()
    assert supervisor.restarts == 1 and not supervisor.gave_up  # restarted, not given up
    supervisor.proc.wait()
    supervisor.check()
    assert supervisor.gave_up and supervisor.exits == [7, 7, 7]


def _stale_hook(tmp_path, **kw):
    hook = RefreshHook(RunStore(str(tmp_path / "run")), None, lambda m: m, corpus_fingerprint="f",
                       dim=8, every_steps=2, is_main=False, **kw)
    hook.watcher.current = types.SimpleNamespace(generation=0, encoder_step=0)
    return hook


def test_a_stale_index_warns_loudly_and_can_stop_the_run(tmp_path, caplog):
    hook = _stale_hook(tmp_path)  # limit: 10 x every_steps = 20
    with caplog.at_level(logging.ERROR, logger="realm.refresh.hook"):
        for step in range(1, 45):
            hook.after_step(step, None)
    warned = [r.getMessage() for r in caplog.records if "steps stale" in r.getMessage()]
    assert len(warned) == 2 and "21 steps stale" in warned[0] and "41 steps stale" in warned[1]
    assert "refresh.max_staleness_steps=20" in warned[0]

    hook = _stale_hook(tmp_path, stale_limit=5, stop_when_stale=True)
    for step in range(1, 6):
        hook.after_step(step, None)
    with pytest.raises(RefresherFailed, match="6 steps stale"):
        hook.after_step(6, None)


def test_closing_stops_the_refresher_even_when_the_watcher_fails(tmp_path):
    stopped = []
    supervisor = types.SimpleNamespace(stop=lambda timeout: stopped.append(timeout))
    hook = RefreshHook(RunStore(str(tmp_path / "run")), None, lambda m: m, corpus_fingerprint="f",
                       dim=8, every_steps=2, is_main=True, supervisor=supervisor)

    def broken():
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "index"))

    hook.watcher.stop = broken
    with pytest.raises(PermissionError):
        hook.close(finished=True)
    assert stopped == [60]
