"""Fault tests with real processes: kill -9, corruption, write errors, GC under readers, races."""

import os
import resource
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from realm.data.store import BlockStore
from realm.refresh.rundir import RunStore
from realm.refresh.watcher import IndexWatcher

from .conftest import (child_env, publish, refresher_cmd, run, start, summary, wait_for_log)


#: end-to-end runs of the stage: the full suite (`pytest`) runs them, the fast tier does not
pytestmark = pytest.mark.slow


def _first_generation(run_dir, corpus, retriever):
    done = run(refresher_cmd(run_dir, corpus, "--retriever", retriever, "--once"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(done)["generations"] == [0]


@pytest.mark.parametrize("point", ["embed", "write", "publish"])
def test_kill_9_leaves_latest_valid_and_restart_commits(point, leads_corpus, tiny_retriever,
                                                        corpus_fp, tmp_path):
    run_dir = tmp_path / "run"
    _first_generation(run_dir, leads_corpus, tiny_retriever)
    store = RunStore(str(run_dir))
    watcher = IndexWatcher(store, corpus_fingerprint=corpus_fp, dim=16, poll_s=0.1)
    assert watcher.wait_for_first(timeout=10).generation == 0
    publish(store, tiny_retriever, step=10, seed=1)

    log = tmp_path / "refresher.log"
    proc = start(refresher_cmd(run_dir, leads_corpus), log, REALM_FAILPOINT=point)
    wait_for_log(log, f"failpoint {point} reached", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    # LATEST still names generation 0, whole; the consumer keeps searching it
    assert store.read_latest()["generation"] == 0
    store.load_generation(0, corpus_fingerprint=corpus_fp, dim=16)
    assert watcher.poll_once() is None and not watcher.maybe_swap()
    queries = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    assert (watcher.search(queries, 5).block_ids >= 0).all()
    leftovers = sorted(n for n in os.listdir(store.path("index")) if "gen-" in n)
    if point == "write":
        assert any(n.startswith(".gen-000001.tmp-") for n in leftovers), leftovers
    if point == "publish":
        assert "gen-000001" in leftovers  # written, renamed, never committed

    done = run(refresher_cmd(run_dir, leads_corpus, "--once"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(done)["generations"] == [1]
    assert store.read_latest()["encoder_step"] == 10
    assert not [n for n in os.listdir(store.path("index")) if n.startswith(".gen-")]
    assert watcher.poll_once() == 1 and watcher.maybe_swap()
    assert watcher.current.generation == 1 and watcher.current.encoder_step == 10


def test_corrupted_or_mismatched_generation_is_rejected_old_kept(leads_corpus, tiny_retriever,
                                                                 corpus_fp, tmp_path):
    run_dir = tmp_path / "run"
    _first_generation(run_dir, leads_corpus, tiny_retriever)
    store = RunStore(str(run_dir))
    watcher = IndexWatcher(store, corpus_fingerprint=corpus_fp, dim=16, poll_s=0.1)
    watcher.wait_for_first(timeout=10)
    n = len(BlockStore(leads_corpus))
    emb = np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32)

    for damage in ("flip", "truncate"):
        g = store.commit_generation(emb, encoder_step=5, corpus_fingerprint=corpus_fp)
        path = store.path("index", f"gen-{g:06d}", "embeddings-00000.f16")
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 3] if damage == "truncate" else data[:-8] + b"\x00" * 8)
        assert watcher.poll_once() is None and not watcher.maybe_swap()
        assert watcher.current.generation == 0
    g = store.commit_generation(emb[:, :8], encoder_step=6, corpus_fingerprint=corpus_fp)
    assert watcher.poll_once() is None  # dim 8 for a 16-d retriever
    g = store.commit_generation(emb, encoder_step=7, corpus_fingerprint="another-corpus")
    assert watcher.poll_once() is None
    assert sorted(watcher.rejected) == [1, 2, 3, 4]
    assert "sha256" in watcher.rejected[1] and "truncated" in watcher.rejected[2]
    assert "dim 8" in watcher.rejected[3] and "fingerprint" in watcher.rejected[4]
    assert watcher.metrics(step=7)["index/rejected"] == 4
    g = store.commit_generation(emb, encoder_step=8, corpus_fingerprint=corpus_fp)
    assert watcher.poll_once() == g and watcher.maybe_swap() and watcher.current.generation == g


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_write_error_is_clear_and_commits_nothing(leads_corpus, tiny_retriever, tmp_path):
    from realm.modeling.retriever import Retriever

    run_dir = tmp_path / "run"
    store = RunStore(str(run_dir))
    store.publish_encoder(Retriever.from_pretrained(tiny_retriever), 0)
    # a "full" target: the refresher may not write a file past 4 KiB (the embeddings are larger)
    done = subprocess.run(refresher_cmd(run_dir, leads_corpus, "--once"), capture_output=True,
                          text=True, timeout=120, env=child_env(), preexec_fn=_limit_file_size)
    assert done.returncode == 1
    assert "nothing was committed" in done.stderr and "File too large" in done.stderr
    assert store.read_latest() is None and store.generations() == []
    assert not [n for n in os.listdir(store.path("index")) if n.startswith(".gen-")]
    # the same command without the limit succeeds
    assert run(refresher_cmd(run_dir, leads_corpus, "--once")).returncode == 0
    assert store.read_latest()["generation"] == 0


READER = textwrap.dedent("""
    import sys, time
    from realm.refresh.rundir import RunStore
    from realm.refresh.watcher import IndexWatcher
    w = IndexWatcher(RunStore(sys.argv[1]), corpus_fingerprint=None, dim=None, poll_s=0.1)
    print("holding", w.wait_for_first(timeout=30).generation, flush=True)
    time.sleep(600)
""")


def test_gc_never_removes_a_generation_a_reader_holds(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    emb = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    store.commit_generation(emb, encoder_step=0, corpus_fingerprint="fp")
    reader = subprocess.Popen([sys.executable, "-c", READER, store.root], stdout=subprocess.PIPE,
                              text=True, env=child_env())
    try:
        assert reader.stdout.readline().split() == ["holding", "0"]
        for step in range(1, 5):
            store.commit_generation(emb * step, encoder_step=step, corpus_fingerprint="fp")
            store.gc_generations(keep=2)
        assert store.generations() == [0, 3, 4]
        assert store.load_generation(0).generation == 0  # whole, checksums pass
    finally:
        reader.kill()
        reader.wait()
    assert store.gc_generations(keep=2) == [0]  # the lease of a dead process no longer pins it


def test_two_refreshers_one_wins(leads_corpus, tiny_retriever, tmp_path):
    from realm.modeling.retriever import Retriever

    run_dir = tmp_path / "run"
    store = RunStore(str(run_dir))
    store.publish_encoder(Retriever.from_pretrained(tiny_retriever), 0)
    # both pause a few seconds while embedding, so their lifetimes overlap
    procs = [start(refresher_cmd(run_dir, leads_corpus, "--once"), tmp_path / f"r{i}.log",
                   REALM_FAILPOINT="embed", REALM_FAILPOINT_S="6") for i in range(2)]
    codes = sorted(p.wait(timeout=120) for p in procs)
    logs = "".join((tmp_path / f"r{i}.log").read_text() for i in range(2))
    assert codes == [0, 3], logs[-3000:]
    assert "another refresher holds" in logs
    assert store.generations() == [0] and store.read_latest()["generation"] == 0
    store.load_generation(0)
