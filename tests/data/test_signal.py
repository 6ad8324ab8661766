"""The wiki-signal data: title matching, the held-out split, Z cuts, the three corpora, the CLI."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from realm.config import DataConfig, SpansConfig
from realm.data import signal
from realm.data.build import OutputExistsError
from realm.data.readers import CorpusReader
from realm.data.signal import build_signal, cut_text, split_titles, title_key
from realm.data.store import BlockStore

REPO = Path(__file__).resolve().parents[2]
N_ARTICLES = 100  # the first 100 articles of the 2015 dump share 42 titles with the lead sections


@pytest.fixture(scope="module")
def files(shared_data, enwiki_head):
    """(lead sections file, the first N_ARTICLES records of the 2015 dump as .jsonl.gz)."""
    return str(shared_data / "wikipedia" / "vital_level4_summaries_en.jsonl"), enwiki_head


@pytest.fixture(scope="module")
def cli_build(files, tmp_path_factory):
    """launch/prepare_wiki_signal.py end to end on the slice (spaCy spans on X)."""
    leads, articles = files
    out = tmp_path_factory.mktemp("signal") / "signal"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "prepare_wiki_signal.py"), "--output", str(out),
         "--leads", leads, "--articles", articles, "--heldout", "8", "--z-chars", "800",
         "--no-progress", "data.max_block_tokens=96"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), out


def test_title_key_matches_word_capitals_not_inner_case():
    assert title_key("Scientific revolution") == title_key("Scientific  Revolution")
    assert title_key("Jean le Rond d'Alembert") == title_key("Jean Le Rond d'Alembert")
    assert title_key("Abraham_Lincoln") == title_key("abraham lincoln")
    assert title_key("Cafe\u0301") == title_key("Café")  # NFC
    for a, b in [("MUMPS", "Mumps"), ("SOAP", "Soap"), ("NeWS", "News"), ("AirPort", "Airport")]:
        assert title_key(a) != title_key(b)


def test_split_is_deterministic_disjoint_and_order_free():
    keys = [f"title {i}" for i in range(50)]
    train, held = split_titles(keys, 10, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert not set(train) & set(held) and set(train) | set(held) == set(keys)
    assert (train, held) == split_titles(list(reversed(keys)), 10, seed=3)
    assert held != split_titles(keys, 10, seed=4)[1]
    for bad in (0, 50):
        with pytest.raises(ValueError, match="heldout must be in"):
            split_titles(keys, bad, seed=0)


def test_cut_text_ends_at_boundaries_within_the_limit(files):
    _, articles = files
    texts = [a.text for a in itertools.islice(CorpusReader(articles), 30)]
    for limit in (150, 600, 2000):
        for text in texts:
            cut = cut_text(text, limit)
            whole = text.strip()
            assert len(cut) <= limit and whole.startswith(cut)
            if len(whole) > limit:
                assert len(cut) >= min(limit // 4, 30)  # real sentences fit, nothing degenerate
                assert whole[len(cut)].isspace()  # a whole word, sentence or paragraph
                assert not signal._is_heading(cut.split("\n")[-1]) or "\n" not in cut


def test_cut_text_prefers_paragraphs_then_sentences():
    text = "First one is here. Second one.\nHeading.\nThird paragraph is long enough. Fourth."
    assert cut_text(text, 45) == "First one is here. Second one."  # heading dropped
    assert cut_text(text, 25) == "First one is here."  # no paragraph fits: a sentence
    assert cut_text(text, 12) == "First one is"  # no sentence fits: a word boundary
    assert cut_text("Short text.", 100) == "Short text."
    text = "Tiny.\nThe longer second paragraph follows here. And a last sentence."
    assert cut_text(text, 50) == "Tiny.\nThe longer second paragraph follows here."  # not "Tiny."


def test_cli_builds_three_corpora(cli_build, files):
    summary, out = cli_build
    stores = {name: BlockStore(out / name, verify=True) for name in signal.CORPORA}
    titles = {name: {title_key(s.title(i)) for i in range(len(s))} for name, s in stores.items()}
    assert summary["matched_titles"] == len(titles["z"]) == 42
    assert summary["train_titles"] == len(titles["x_train"]) == 34
    assert summary["heldout_titles"] == len(titles["x_heldout"]) == 8
    assert not titles["x_train"] & titles["x_heldout"]
    assert titles["x_train"] | titles["x_heldout"] == titles["z"]
    for name, store in stores.items():
        assert summary[f"{name}_blocks"] == len(store)
        assert store.lengths().max() <= 96
    assert summary["x_train_spans"] == stores["x_train"].manifest["counts"]["spans"] > 0
    assert stores["z"].manifest["counts"]["spans"] == 0
    assert stores["z"].manifest["params"]["spans"]["enabled"] is False
    # Z holds the 2015 text cut to 800 characters, not the leads
    z_texts = [json.loads(line)["text"] for line in open(out / "sources" / "z.jsonl")]
    assert all(200 <= len(t) <= 800 for t in z_texts)
    leads = {json.loads(line)["text"] for line in open(out / "sources" / "x_train.jsonl")}
    assert not leads & set(z_texts)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "wiki_signal" and manifest["counts"]["articles_read"] == N_ARTICLES


def test_rerun_is_a_noop_and_other_params_are_refused(cli_build, files):
    summary, out = cli_build
    leads, articles = files
    data = DataConfig(max_block_tokens=96)
    again = build_signal(leads, articles, str(out), data, SpansConfig(), heldout=8, z_chars=800)
    assert again["reused"] and {k: v for k, v in again.items() if k not in ("reused", "seconds")} \
        == {k: v for k, v in summary.items() if k not in ("reused", "seconds")}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        build_signal(leads, articles, str(out), data, SpansConfig(), heldout=9, z_chars=800)


def test_interrupted_build_leaves_no_manifest_and_resumes(files, tmp_path, monkeypatch):
    leads, articles = files
    out = tmp_path / "signal"
    real = signal.build_corpus

    def dies_at_heldout(data, spans, output, **kw):  # the last of the three corpora
        if output.endswith("x_heldout"):
            raise KeyboardInterrupt
        return real(data, spans, output, **kw)

    args = (leads, articles, str(out), DataConfig(max_block_tokens=64), SpansConfig(enabled=False))
    monkeypatch.setattr(signal, "build_corpus", dies_at_heldout)
    with pytest.raises(KeyboardInterrupt):
        build_signal(*args, heldout=5, z_chars=400, progress=False)
    assert not (out / "manifest.json").exists() and not (out / "x_heldout").exists()
    done = {name: os.stat(out / name / "manifest.json").st_ino for name in ("z", "x_train")}
    monkeypatch.setattr(signal, "build_corpus", real)
    summary = build_signal(*args, heldout=5, z_chars=400, progress=False)
    assert (out / "manifest.json").exists() and summary["z_blocks"] == len(BlockStore(out / "z"))
    for name, inode in done.items():  # reused, not rebuilt
        assert os.stat(out / name / "manifest.json").st_ino == inode
    x_manifest = BlockStore(out / "x_train").manifest
    assert x_manifest["counts"]["spans"] == 0 and summary["heldout_titles"] == 5


def _holders(z: BlockStore) -> list[tuple[int, list[int]]]:
    """Each Z article's (id, word pieces of its body then, separately, its title)."""
    out = []
    for a, art in enumerate(z.articles):
        first, n = int(art["first_block"]), int(art["n_blocks"])
        body = [t for b in range(first, first + n) for t in z.body_ids(b).tolist()]
        out.append((a, body))
        out.append((a, z.title_ids(first).tolist()))
    return out


def _brute_articles(segments, run: list[int]) -> set[int]:
    n = len(run)
    return {a for a, seg in segments
            if any(seg[i:i + n] == run for i in range(len(seg) - n + 1))}


def test_span_articles_finds_every_run_within_an_article_and_nothing_else(cli_build):
    _, out = cli_build
    z = BlockStore(out / "z")
    index = signal.SpanArticles(z, max_len=6)
    segments = _holders(z)
    body0, body1 = segments[0][1], segments[2][1]
    runs = [body0[:1], body0[3:7], body0[-6:], body1[10:12], z.title_ids(0).tolist(),
            body0[-3:] + body1[:3]]  # the last one crosses from one article into the next
    for run in runs:
        assert set(index.articles(np.array(run)).tolist()) == _brute_articles(segments, run), run
    assert len(index.articles(np.array(body0[-3:] + body1[:3]))) == 0
    assert len(index.articles(np.array(body0[:7]))) == 0  # longer than max_len
    assert len(index.articles(np.array([10**6]))) == 0  # no such word piece


def test_span_filter_keeps_the_spans_only_the_same_title_holds(cli_build, files, tmp_path):
    summary, out = cli_build
    leads, articles = files
    filtered = tmp_path / "signal"
    got = build_signal(leads, articles, str(filtered), DataConfig(max_block_tokens=96),
                       SpansConfig(), heldout=8, z_chars=800, span_max_articles=2, progress=False)
    z = BlockStore(out / "z")
    segments = _holders(z)
    article_of = {title_key(z.title(int(b))): a for a, b in enumerate(z.articles["first_block"])}
    for name in ("x_train", "x_heldout"):
        full, kept = BlockStore(out / name), BlockStore(filtered / name, verify=True)
        assert len(full) == len(kept)
        expected, dropped = [], 0
        for i in range(len(full)):
            body = full.body_ids(i).tolist()
            for span in full.spans(i):
                holders = _brute_articles(segments, body[span["start"]:span["end"]])
                if article_of[title_key(full.title(i))] in holders and len(holders) <= 2:
                    expected.append((i, int(span["start"]), int(span["end"])))
                else:
                    dropped += 1
        found = [(i, int(s["start"]), int(s["end"])) for i in range(len(kept)) for s in kept.spans(i)]
        assert found == expected and 0 < len(found) < summary[f"{name}_spans"]
        assert got[f"{name}_spans"] == len(found) and got[f"{name}_spans_filtered_out"] == dropped
        assert kept.manifest["params"]["span_filter"].startswith("same_title:max_articles=2")
    assert got["z_blocks"] == summary["z_blocks"] and summary["x_train_spans_filtered_out"] == 0
    with pytest.raises(ValueError, match="span_max_articles"):
        build_signal(leads, articles, str(tmp_path / "other"), DataConfig(), SpansConfig(),
                     span_max_articles=0)
