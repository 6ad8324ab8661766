"""The run directory: orphan cleanup, the refresher lock, encoder snapshots, pointer checks."""

import os

import numpy as np
import pytest

from realm.errors import GenerationError, StoreLockedError
from realm.refresh.rundir import RunStore


@pytest.fixture
def store(run_dir_url):
    return RunStore(run_dir_url)


def _emb(n=64, dim=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_orphans_of_a_killed_writer_are_cleaned(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.commit_generation(_emb(), encoder_step=0, corpus_fingerprint="fp")
    os.makedirs(store.path("index", ".gen-000001.tmp-999-abcd"))      # killed before rename
    os.makedirs(store.path("index", "gen-000001"))                     # killed before LATEST
    removed = store.clean_orphans()
    assert sorted(removed) == [".gen-000001.tmp-999-abcd", "gen-000001"]
    assert store.generations() == [0] and store.read_latest()["generation"] == 0
    # the next commit takes the number the orphan had
    assert store.commit_generation(_emb(), encoder_step=1, corpus_fingerprint="fp") == 1


def test_refresher_lock_is_exclusive(store):
    other = RunStore(store.url)
    store.acquire_refresher_lock("first")
    with pytest.raises(StoreLockedError, match="another refresher|refresher first holds"):
        other.acquire_refresher_lock("second")
    store.release_refresher_lock()
    other.acquire_refresher_lock("second")
    other.release_refresher_lock()


def test_encoder_snapshots_publish_and_gc(store, tiny_retriever):
    from realm.modeling.retriever import Retriever

    retriever = Retriever.from_pretrained(tiny_retriever)
    for step in (0, 10, 20):
        store.publish_encoder(retriever, step, keep=2)
    assert store.encoder_steps() == [10, 20]
    latest = store.latest_encoder()
    assert latest["step"] == 20
    with store.local_encoder(latest["path"]) as local:
        again = Retriever.from_pretrained(local)
    assert again.dim == 16


def test_paths_in_pointers_and_manifests_are_only_the_stores_own_names(store):
    """A `../` path in snapshots/LATEST, or a manifest listing a file the store never writes,
    is refused as corrupt instead of being read from outside the run directory."""
    store.write_json_atomic(store.path("snapshots", "LATEST"),
                            {"step": 45, "path": "../../../elsewhere"})
    with pytest.raises(ValueError, match=r"'\.\./\.\./\.\./elsewhere' for step 45, not "
                                         r"'step-000045': refused as corrupt"):
        store.latest_encoder()
    store.write_json_atomic(store.path("snapshots", "LATEST"), {"step": 45, "path": "step-000045"})
    assert store.latest_encoder()["path"].endswith("snapshots/step-000045")
    g = store.commit_generation(_emb(), encoder_step=0, corpus_fingerprint="fp")
    where = store.path("index", f"gen-{g:06d}", "manifest.json")
    manifest = store.read_json(where)
    manifest["files"]["../../../../etc/hostname"] = {"bytes": 10, "sha256": "0" * 64}
    store.write_json_atomic(where, manifest)
    with pytest.raises(GenerationError, match="etc/hostname.*refused as corrupt"):
        store.load_generation(g)


def test_a_run_made_before_the_rename_keeps_its_snapshots_in_encoders(tmp_path, tiny_retriever):
    """Runs made before ``snapshots/`` (retriever snapshots) and ``reader/`` (the reader) were
    named so keep ``encoders/`` and ``encoder/``: both are still found."""
    import shutil

    from realm.hub import run_part
    from realm.refresh.rundir import RunStore

    old = tmp_path / "old"
    shutil.copytree(tiny_retriever, old / "encoders" / "step-000005")
    (old / "encoders" / "LATEST").write_text('{"step": 5, "path": "step-000005"}')
    store = RunStore(str(old))
    assert store.encoder_steps() == [5]
    assert store.latest_encoder()["path"] == f"{old}/encoders/step-000005"
    assert not (old / "snapshots").exists()
    new = RunStore(str(tmp_path / "new"))
    assert new.path(new.snapshots) == f"{tmp_path}/new/snapshots"
    shutil.copytree(tiny_retriever, old / "encoder")  # any saved model with a manifest
    assert run_part(old, "reader") == str(old / "encoder")
    shutil.copytree(tiny_retriever, old / "reader")
    assert run_part(old, "reader") == str(old / "reader")
    assert run_part(tiny_retriever, "reader") == str(tiny_retriever)  # a saved model itself
