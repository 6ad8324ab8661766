"""Index generations: commit through LATEST, validation, leases and GC, on local and memory fs."""

import json
import os

import numpy as np
import pytest

from realm.errors import GenerationError
from realm.index.generations import GenerationStore as RunStore


@pytest.fixture
def store(run_dir_url):
    return RunStore(run_dir_url)


def _emb(n=64, dim=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_commit_load_and_pointer(store):
    assert store.read_latest() is None
    emb = _emb()
    g0 = store.commit_generation(emb, encoder_step=0, corpus_fingerprint="fp",
                                 timings={"embed_s": 1.5})
    g1 = store.commit_generation(emb * 2, encoder_step=100, corpus_fingerprint="fp")
    assert (g0, g1) == (0, 1)
    latest = store.read_latest()
    assert latest["generation"] == 1 and latest["encoder_step"] == 100
    gen = store.load_generation(1, corpus_fingerprint="fp", dim=8)
    m = gen.manifest
    assert (m["n_blocks"], m["dim"], m["index_type"], m["embedding_dtype"]) == (64, 8, "Flat", "float16")
    assert set(m["files"]) == {"embeddings-00000.f16"} and m["format_version"] == 2
    assert m["shards"] == [{"file": "embeddings-00000.f16", "start": 0, "end": 64}]
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    # the index holds the float16 embeddings: search ranks as fp16 numpy does
    q = _emb(5, seed=1)
    want = np.argsort(-(q @ (emb * 2).astype(np.float16).astype(np.float32).T), axis=1)[:, :3]
    np.testing.assert_array_equal(gen.search(q, 3).block_ids, want)
    assert store.load_generation(0).manifest["timings"]["embed_s"] == 1.5


def test_trained_index_is_stored_and_reloaded(store):
    from realm.index.mips import MipsIndex

    emb = _emb(500, 8)
    built = MipsIndex.build(emb, "HNSW8")
    g = store.commit_generation(emb, encoder_step=1, corpus_fingerprint="fp", factory="HNSW8",
                                index_bytes=built.to_bytes())
    gen = store.load_generation(g)
    assert "index.faiss" in gen.manifest["files"] and gen.index.factory == "HNSW8"
    np.testing.assert_array_equal(gen.search(emb[:7], 4).block_ids, built.search(emb[:7], 4).block_ids)


def test_mismatched_corpus_or_dim_is_rejected(store):
    store.commit_generation(_emb(), encoder_step=0, corpus_fingerprint="fp")
    with pytest.raises(GenerationError, match="corpus fingerprint fp != other"):
        store.load_generation(0, corpus_fingerprint="other")
    with pytest.raises(GenerationError, match="dim 8 != retriever dim 16"):
        store.load_generation(0, dim=16)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupted_files_are_rejected(store, damage):
    store.commit_generation(_emb(), encoder_step=0, corpus_fingerprint="fp")
    path = store.path("index", "gen-000000", "embeddings-00000.f16")
    data = store.fs.cat_file(path)
    if damage == "flip":
        store.fs.pipe_file(path, data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
        match = "sha256 differs"
    elif damage == "truncate":
        store.fs.pipe_file(path, data[: len(data) // 2])
        match = "truncated"
    else:
        store.fs.rm_file(path)
        match = "missing"
    with pytest.raises(GenerationError, match=match):
        store.load_generation(0)


def test_gc_keeps_newest_and_leased(store):
    for step in range(3):
        store.commit_generation(_emb(), encoder_step=step, corpus_fingerprint="fp")
    store.acquire_lease("reader-a", 0)
    for step in range(3, 6):
        store.commit_generation(_emb(), encoder_step=step, corpus_fingerprint="fp")
    removed = store.gc_generations(keep=2)
    assert removed == [1, 2, 3] and store.generations() == [0, 4, 5]
    assert store.load_generation(0).generation == 0  # the reader's generation is whole
    store.release_lease("reader-a")
    assert store.gc_generations(keep=2) == [0] and store.generations() == [4, 5]


def test_stale_lease_does_not_pin(store):
    store.commit_generation(_emb(), encoder_step=0, corpus_fingerprint="fp")
    store.acquire_lease("old-reader", 0)
    lease = store.path("index", "readers", "old-reader.json")
    info = json.loads(store.fs.cat_file(lease))
    info["time"] -= 3600
    store.fs.pipe_file(lease, json.dumps(info).encode())
    for step in range(1, 4):
        store.commit_generation(_emb(), encoder_step=step, corpus_fingerprint="fp")
    assert 0 in store.gc_generations(keep=1, lease_timeout_s=600)


def test_a_taken_generation_number_is_not_overwritten(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.commit_generation(_emb(), encoder_step=0, corpus_fingerprint="fp")
    # another writer's finished directory for generation 1 appears before we rename ours
    os.makedirs(store.path("index", "gen-000001"))
    with open(store.path("index", "gen-000001", "manifest.json"), "w") as f:
        f.write("{}")
    gens_before = store.generations()
    with pytest.raises(GenerationError, match="committed by another writer"):
        store._write_generation_local("gen-000001", [("embeddings-00000.f16", b"x")], b"{}")
    assert store.generations() == gens_before
    assert not [n for n in os.listdir(store.path("index")) if n.startswith(".gen-")]


def test_pinned_lease_holds_until_released(store):
    store.commit_generation(_emb(), encoder_step=0, corpus_fingerprint="fp")
    store.acquire_lease("checkpoint-step-000010", 0, pinned=True)
    lease = store.path("index", "readers", "checkpoint-step-000010.json")
    info = json.loads(store.fs.cat_file(lease))
    info.update(time=info["time"] - 86400, pid=2**22 + 12345)  # old, and its process is gone
    store.fs.pipe_file(lease, json.dumps(info).encode())
    for step in range(1, 4):
        store.commit_generation(_emb(), encoder_step=step, corpus_fingerprint="fp")
    assert 0 not in store.gc_generations(keep=1) and 0 in store.generations()
    store.release_lease("checkpoint-step-000010")
    assert 0 in store.gc_generations(keep=1)
