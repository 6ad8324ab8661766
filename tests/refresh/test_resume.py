"""A refresh that resumes: a refresher killed mid-generation, restarted for the same snapshot,
embeds only the shards it had not committed, and commits what an uninterrupted refresh does."""

import os
import signal

import numpy as np
import pytest

from realm.data.store import BlockStore
from realm.index.building import builds
from realm.refresh.refresher import Refresher, RefreshSettings
from realm.refresh.rundir import RunStore

from .conftest import refresher_cmd, run, start, summary, wait_for_log

SHARD = 40


class Killed(Exception):
    pass


def _settings(**kw):
    return RefreshSettings(heartbeat_timeout_s=0, poll_s=0.1, shard_blocks=SHARD, **kw)


def _store(path, retriever_dir):
    from realm.modeling.retriever import Retriever

    store = RunStore(str(path))
    store.publish_encoder(Retriever.from_pretrained(retriever_dir), step=0)
    return store


def _embedded(monkeypatch):
    """Block ids handed to ``embed_blocks`` from now on (one array per shard)."""
    import realm.refresh.refresher as refresher

    calls, original = [], refresher.embed_blocks

    def embed(retriever, store, special, ids, *args, **kwargs):
        calls.append(np.asarray(ids))
        return original(retriever, store, special, ids, *args, **kwargs)

    monkeypatch.setattr(refresher, "embed_blocks", embed)
    return calls


def test_a_refresh_stopped_after_some_shards_embeds_only_the_rest(leads_corpus, tiny_retriever,
                                                                  tmp_path, monkeypatch):
    import realm.refresh.refresher as refresher

    corpus = BlockStore(leads_corpus)
    n = len(corpus)
    shards = -(-n // SHARD)
    assert shards >= 4
    store = _store(tmp_path / "run", tiny_retriever)

    def die_after_third(name):  # the process dies right after committing its third shard
        if name == "shard-3":
            raise Killed(name)

    monkeypatch.setattr(refresher, "failpoint", die_after_third)
    with pytest.raises(Killed):
        Refresher(store, corpus, _settings()).run(once=True)
    assert store.read_latest() is None and len(builds(store)) == 1

    monkeypatch.setattr(refresher, "failpoint", lambda name: None)
    calls = _embedded(monkeypatch)
    out = Refresher(store, corpus, _settings()).run(once=True)
    assert out["generations"] == [0] and builds(store) == []
    assert [int(c[0]) for c in calls] == [SHARD * i for i in range(3, shards)]  # the rest only
    gen = store.load_generation(0, corpus_fingerprint=corpus.fingerprint, gpu=False)
    m = gen.manifest
    assert (m["shards_resumed"], m["blocks_embedded"]) == (3, n - 3 * SHARD)

    # what an uninterrupted refresh of the same snapshot commits, bit for bit
    other = _store(tmp_path / "other", tiny_retriever)
    Refresher(other, corpus, _settings()).run(once=True)
    whole = other.load_generation(0, gpu=False)
    assert whole.manifest["shards_resumed"] == 0
    np.testing.assert_array_equal(gen.embeddings, whole.embeddings)
    assert [s["sha256"] for s in m["files"].values()] == \
        [s["sha256"] for s in whole.manifest["files"].values()]


def test_a_newer_snapshot_does_not_reuse_an_older_ones_shards(leads_corpus, tiny_retriever,
                                                              tmp_path, monkeypatch):
    import realm.refresh.refresher as refresher
    from .conftest import publish

    corpus = BlockStore(leads_corpus)
    store = _store(tmp_path / "run", tiny_retriever)

    def die(name):
        if name == "shard-2":
            raise Killed(name)

    monkeypatch.setattr(refresher, "failpoint", die)
    with pytest.raises(Killed):
        Refresher(store, corpus, _settings()).run(once=True)
    (old,) = builds(store)
    publish(store, tiny_retriever, step=10, seed=1)  # the trainer moved on meanwhile
    monkeypatch.setattr(refresher, "failpoint", lambda name: None)
    calls = _embedded(monkeypatch)
    out = Refresher(store, corpus, _settings()).run(once=True)
    assert out["generations"] == [0] and old not in builds(store)
    assert sum(len(c) for c in calls) == len(corpus)  # everything, with the new encoder
    assert store.read_generation_manifest(0)["encoder_step"] == 10


@pytest.mark.slow
def test_kill_9_mid_generation_then_restart_embeds_the_missing_shards(leads_corpus,
                                                                      tiny_retriever, tmp_path):
    store = _store(tmp_path / "run", tiny_retriever)
    n = len(BlockStore(leads_corpus))
    log = tmp_path / "refresher.log"
    cmd = refresher_cmd(store.root, leads_corpus, "--once", f"index.shard_blocks={SHARD}")
    proc = start(cmd, log, REALM_FAILPOINT="shard-4", REALM_FAILPOINT_S="60")
    wait_for_log(log, "failpoint shard-4 reached", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.read_latest() is None
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 of" in done.stderr and "shards were done" in done.stderr
    assert summary(done)["generations"] == [0]
    m = store.read_generation_manifest(0)
    assert (m["shards_resumed"], m["blocks_embedded"]) == (4, n - 4 * SHARD)
    assert builds(store) == []
