"""The one cache key: inputs named by path are keyed by their content, so that a fresh clone in
another directory finds what it cached and changed data is never served from the cache."""

import os
import shutil

from realm.cache import content_key
from realm.config import load_config
from realm.training.prepare import dpr_cache_dir


def _config(qa: str, cache: str):
    return load_config("configs/dpr_leads.yaml", [f"openqa.train_qa={qa}",
                                                  f"retriever_training.train_qa={qa}",
                                                  f"cache_dir={cache}"])


def test_dpr_cache_is_keyed_by_content_not_by_path(leads_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    qa = tmp_path / "a" / "train.jsonl"
    qa.parent.mkdir()
    qa.write_text('{"question": "who painted the mona lisa", "answers": ["Leonardo"]}\n')
    moved = tmp_path / "b" / "train.jsonl"  # the same questions in another clone's data/
    moved.parent.mkdir()
    shutil.copy(qa, moved)
    corpus_copy = tmp_path / "corpus"
    shutil.copytree(leads_corpus, corpus_copy)

    first = dpr_cache_dir(_config(str(qa), "runs/cache"), leads_corpus)
    assert first == dpr_cache_dir(_config(str(moved), "runs/cache"), str(corpus_copy))
    assert content_key(leads_corpus) == content_key(str(corpus_copy))
    assert set(content_key(leads_corpus)) == {"fingerprint"}

    moved.write_text('{"question": "who painted the mona lisa", "answers": ["Raphael"]}\n')
    assert dpr_cache_dir(_config(str(moved), "runs/cache"), leads_corpus) != first


def test_content_key_of_a_file_a_directory_and_a_name(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("abc")
    assert content_key(str(f)) == {
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "bytes": 3}
    assert content_key("sentence-transformers/all-MiniLM-L6-v2") == \
        "sentence-transformers/all-MiniLM-L6-v2"  # a hub name, as given
    (tmp_path / "model").mkdir()
    assert content_key(str(tmp_path / "model")) == str(tmp_path / "model")
    (tmp_path / "model" / "manifest.json").write_text('{"kind": "retriever"}')
    key = content_key(str(tmp_path / "model"))
    assert set(key) == {"manifest_sha256"}
    (tmp_path / "model" / "manifest.json").write_text('{"kind": "retriever", "steps": 2}')
    assert content_key(str(tmp_path / "model")) != key
