"""Sharded generations: float16 shard files of N x d x 2 bytes, ranks that read only their own
shards, a corrupt shard refused, format-1 (one embeddings.npy) generations still loading, a
bounded peak while loading, and generations built shard by shard (resumable)."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from realm.errors import GenerationError
from realm.index.building import GenerationBuild, builds
from realm.index.mips import array_to_bytes
from realm.index.shards import Segment, rank_rows, shard_bounds
from realm.refresh.rundir import RunStore

REPO = Path(__file__).resolve().parents[2]


def _emb(n=64, dim=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float16)


@pytest.fixture
def store(run_dir_url):
    return RunStore(run_dir_url)


def _opened(monkeypatch, store):
    """Paths ``store.fs.open`` is asked for from now on."""
    seen = []
    original = store.fs.open

    def record(path, *args, **kwargs):
        seen.append(os.path.basename(str(path)))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(store.fs, "open", record)
    return seen


def test_shards_are_n_by_d_by_2_bytes_and_listed_in_the_manifest(store):
    emb = _emb(100, 8)
    g = store.commit_generation(emb, encoder_step=0, corpus_fingerprint="fp", shard_blocks=30)
    m = store.read_generation_manifest(g)
    assert [(s["start"], s["end"]) for s in m["shards"]] == [(0, 30), (30, 60), (60, 90), (90, 100)]
    where = store.path("index", "gen-000000")
    sizes = {s["file"]: store.fs.size(f"{where}/{s['file']}") for s in m["shards"]}
    assert sum(sizes.values()) == 100 * 8 * 2  # raw float16: nothing but the rows
    assert all(sizes[s["file"]] == (s["end"] - s["start"]) * 8 * 2 for s in m["shards"])
    assert set(m["files"]) == set(sizes)  # a Flat generation holds nothing else
    for name, info in m["files"].items():
        assert info["sha256"] == hashlib.sha256(store.fs.cat_file(f"{where}/{name}")).hexdigest()
    gen = store.load_generation(g, corpus_fingerprint="fp", dim=8, gpu=False)
    np.testing.assert_array_equal(gen.embeddings, emb)
    q = _emb(5, 8, seed=1).astype(np.float32)
    want = np.argsort(-(q @ emb.astype(np.float32).T), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(gen.search(q, 4).block_ids, want)
    assert store.validate_generation(g, "fp") is None


def test_a_rank_reads_only_its_own_shards(store, monkeypatch):
    emb = _emb(100, 8)
    store.commit_generation(emb, encoder_step=0, corpus_fingerprint="fp", shard_blocks=10)
    held = []
    for rank in range(3):
        opened = _opened(monkeypatch, store)
        gen = store.load_generation(0, corpus_fingerprint="fp", gpu=False, shard=(rank, 3))
        start, end = gen.rows
        files = {f"embeddings-{i:05d}.f16" for i in range(start // 10, (end + 9) // 10)}
        assert start % 10 == 0 and (end % 10 == 0 or end == 100)  # whole shards
        assert set(opened) - {"manifest.json"} == files  # and no other rank's
        np.testing.assert_array_equal(gen.index.block_ids, np.arange(start, end))
        np.testing.assert_array_equal(gen.embeddings, emb[start:end])
        held.append((start, end))
        monkeypatch.undo()
    assert held == [(0, 30), (30, 70), (70, 100)]  # cover every row once, ~a third each


def test_rank_rows_snap_to_shard_boundaries_or_fall_back():
    segments = [Segment(f"s{i}", a, b, 0, "") for i, (a, b) in enumerate(shard_bounds(101, 10))]
    cuts = [rank_rows(segments, 101, r, 4) for r in range(4)]
    assert cuts == [(0, 30), (30, 50), (50, 80), (80, 101)]
    one = [Segment("s0", 0, 101, 0, "")]  # fewer shards than ranks: the balanced rows
    assert [rank_rows(one, 101, r, 2) for r in range(2)] == [(0, 51), (51, 101)]


def test_a_corrupt_shard_refuses_the_generation_and_the_watcher_keeps_the_old_one(tmp_path):
    from realm.refresh.watcher import IndexWatcher

    store = RunStore(str(tmp_path / "run"))
    store.commit_generation(_emb(), encoder_step=0, corpus_fingerprint="fp", shard_blocks=16)
    watcher = IndexWatcher(store, corpus_fingerprint="fp", dim=8, gpu=False)
    assert watcher.wait_for_first(timeout=5).generation == 0
    g = store.commit_generation(_emb(seed=1), encoder_step=5, corpus_fingerprint="fp",
                                shard_blocks=16)
    path = store.path("index", "gen-000001", "embeddings-00002.f16")
    data = bytearray(open(path, "rb").read())
    data[7] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert watcher.poll_once() is None and not watcher.maybe_swap()
    assert watcher.current.generation == 0
    assert "embeddings-00002.f16: sha256 differs" in watcher.rejected[g]
    assert "sha256 differs" in store.validate_generation(g)
    # the rank whose rows lie elsewhere never reads the damaged shard; the one that does refuses
    store.load_generation(g, gpu=False, shard=(0, 2))
    with pytest.raises(GenerationError, match="embeddings-00002.f16: sha256 differs"):
        store.load_generation(g, gpu=False, shard=(1, 2))


def _format_1_generation(store, emb, generation=0, factory="Flat", index_bytes=None):
    """A generation as realm wrote it before shards: embeddings.npy + block_ids.npy."""
    files = {"embeddings.npy": array_to_bytes(emb),
             "block_ids.npy": array_to_bytes(np.arange(len(emb), dtype=np.int64))}
    if index_bytes is not None:
        files["index.faiss"] = index_bytes
    where = store.path("index", f"gen-{generation:06d}")
    store.fs.makedirs(where, exist_ok=True)
    for name, data in files.items():
        store.fs.pipe_file(f"{where}/{name}", data)
    manifest = {"kind": "index_generation", "format_version": 1, "generation": generation,
                "encoder_step": 0, "corpus_fingerprint": "fp", "dim": emb.shape[1],
                "n_blocks": len(emb), "index_type": factory, "embedding_dtype": "float16",
                "files": {k: {"bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()}
                          for k, v in files.items()},
                "timings": {}, "created": time.time()}
    store.fs.pipe_file(f"{where}/manifest.json", json.dumps(manifest).encode())
    store.write_json_atomic(store.path("index", "LATEST"), {
        "generation": generation, "path": f"gen-{generation:06d}", "encoder_step": 0,
        "corpus_fingerprint": "fp", "time": time.time()})


def test_format_1_generations_still_load(store):
    from realm.index.mips import MipsIndex

    emb = _emb(51, 8)
    _format_1_generation(store, emb)
    assert store.validate_generation(0, "fp") is None
    whole = store.load_generation(0, corpus_fingerprint="fp", dim=8, gpu=False)
    np.testing.assert_array_equal(whole.embeddings, emb)
    np.testing.assert_allclose(whole.embeddings_of(np.array([[3, -1]])),
                               [[emb[3].astype(np.float32), np.zeros(8)]])
    halves = [store.load_generation(0, gpu=False, shard=(r, 2)) for r in range(2)]
    assert [h.rows for h in halves] == [(0, 26), (26, 51)]
    np.testing.assert_array_equal(halves[1].index.block_ids, np.arange(26, 51))
    np.testing.assert_array_equal(halves[1].embeddings, emb[26:])
    # a trained index stored beside it loads as stored
    built = MipsIndex.build(emb, "HNSW8", gpu=False)
    _format_1_generation(store, emb, generation=1, factory="HNSW8", index_bytes=built.to_bytes())
    hnsw = store.load_generation(1, gpu=False)
    np.testing.assert_array_equal(hnsw.search(emb[:5].astype(np.float32), 3).block_ids,
                                  built.search(emb[:5], 3).block_ids)
    # and a damaged one is refused
    path = store.path("index", "gen-000000", "embeddings.npy")
    store.fs.pipe_file(path, store.fs.cat_file(path)[:-4] + b"\0\0\0\0")
    with pytest.raises(GenerationError, match="embeddings.npy: sha256 differs"):
        store.load_generation(0, gpu=False)


PEAK = textwrap.dedent("""
    import json, sys
    import faiss
    from realm.refresh.rundir import RunStore

    def status(key):  # kB in /proc/self/status
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    store = RunStore(sys.argv[1])
    store.read_generation_manifest(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current resident size
    before = status("VmRSS")
    gen = store.load_generation(0, gpu=False, shard=None if sys.argv[2] == "all" else (0, 2))
    print(json.dumps({"grew": status("VmHWM") - before,
                      "index": gen.index.ntotal * gen.index.dim * 4}))
""")


@pytest.mark.parametrize("part", ["all", "half"])
def test_loading_peaks_near_the_index_size(tmp_path, part):
    """A generation of 400k x 64 (51 MB of float16 shards, a 102 MB exact index): loading it,
    or a rank's half, grows the process by the index it keeps, not by copies of the rows."""
    store = RunStore(str(tmp_path / "run"))
    rng = np.random.default_rng(0)
    store.commit_generation(rng.standard_normal((400_000, 64), dtype=np.float32).astype(np.float16),
                            encoder_step=0, corpus_fingerprint="fp", shard_blocks=50_000)
    done = subprocess.run([sys.executable, "-c", PEAK, store.root, part], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["index"] == (400_000 if part == "all" else 200_000) * 64 * 4
    # the index, plus a constant (a 4 MiB read buffer, the block ids, allocator slack): before
    # shards, a whole embeddings file, its parsed copy and the kept embeddings came on top
    assert out["grew"] <= 1.05 * out["index"] + (16 << 20), out


def _plan(**kw):
    return {"encoder_step": 5, "snapshot": "abc", "n_blocks": 50, "dim": 8, "shard_blocks": 12,
            **kw}


def test_a_build_commits_shard_by_shard_and_resumes_what_is_missing(store):
    emb = _emb(50, 8)
    build = GenerationBuild(store, _plan())
    assert build.prepare() == [] and build.missing() == [0, 1, 2, 3, 4]
    for i in (0, 3):
        start, end = build.bounds[i]
        build.write_shard(i, emb[start:end])
    # a shard file without its marker (killed between the two) is not done
    store.fs.pipe_file(build.path_of("embeddings-00001.f16"), b"\0" * 192)
    again = GenerationBuild(store, _plan())  # a restarted refresher, same snapshot and plan
    assert again.dir == build.dir and again.prepare() == [0, 3]
    with pytest.raises(ValueError, match=r"shards \[1, 2, 4\] of 5 are not done"):
        store.commit_build(again, encoder_step=5, corpus_fingerprint="fp")
    for i in again.missing():
        start, end = again.bounds[i]
        again.write_shard(i, emb[start:end])
    g = store.commit_build(again, encoder_step=5, corpus_fingerprint="fp",
                           extra={"resumed_shards": 2})
    assert builds(store) == []  # the build is gone once committed
    gen = store.load_generation(g, corpus_fingerprint="fp", dim=8, gpu=False)
    np.testing.assert_array_equal(gen.embeddings, emb)
    m = gen.manifest
    assert len(m["shards"]) == 5 and m["resumed_shards"] == 2 and m["encoder_step"] == 5


def test_another_snapshot_starts_a_new_build_and_removes_the_old(store):
    old = GenerationBuild(store, _plan())
    old.prepare()
    old.write_shard(0, _emb(12, 8))
    new = GenerationBuild(store, _plan(encoder_step=6, snapshot="def"))
    assert new.dir != old.dir and new.prepare() == [] and builds(store) == [new.name]
    with pytest.raises(ValueError, match="shape"):
        new.write_shard(0, _emb(11, 8))
