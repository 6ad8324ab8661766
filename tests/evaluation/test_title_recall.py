"""Same-title recall: masked lead sentences (X) -> the 2015 article of the same title (Z)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from realm.config import DataConfig, SpansConfig
from realm.data.mlm import MLMDataset
from realm.data.signal import build_signal, title_key
from realm.data.store import BlockStore
from realm.evaluation.run import (
    BM25Searcher,
    DenseSearcher,
    masked_query_texts,
    random_recall,
    title_recall,
)
from realm.hub import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def signal_dir(shared_data, enwiki_head, tmp_path_factory):
    """X/Z from the first 100 articles of the 2015 dump (42 shared titles, 6 held out)."""
    out = tmp_path_factory.mktemp("title-recall") / "signal"
    build_signal(str(shared_data / "wikipedia" / "vital_level4_summaries_en.jsonl"), enwiki_head,
                 str(out), DataConfig(max_block_tokens=96), SpansConfig(), heldout=6, z_chars=600,
                 progress=False)
    return out


@pytest.fixture(scope="module")
def stores(signal_dir):
    return BlockStore(signal_dir / "x_heldout"), BlockStore(signal_dir / "z")


@pytest.fixture(scope="module")
def tokenizer(stores):
    return load_tokenizer(stores[0].manifest["tokenizer"]["path"])


class OracleSearcher:
    """Puts a block of the query's own article at rank ``rank``, other articles' blocks around it."""

    def __init__(self, queries, knowledge, tokenizer, rank):
        ds = MLMDataset(queries, tokenizer.mask_token_id, seed=0)
        self.target = {}
        for i in range(len(ds)):
            ex = ds[i]
            key = title_key(queries.title(ex.block_id))
            self.target[tuple(ex.query_ids.tolist())] = (
                [b for b in range(len(knowledge)) if title_key(knowledge.title(b)) == key][0],
                [b for b in range(len(knowledge)) if title_key(knowledge.title(b)) != key])
        self.rank = rank

    def search_ids(self, queries, k):
        rows = []
        for q in queries:
            hit, others = self.target[tuple(np.asarray(q).tolist())]
            rows.append((others[: self.rank] + [hit] + others[self.rank:])[:k])
        return np.array(rows)


def _direct_recall(queries, knowledge, examples, ids, k):
    """Count by hand: a retrieved block among the first k has the query's title."""
    found = [any(title_key(knowledge.title(int(b))) == title_key(queries.title(ex.block_id))
                 for b in row[:k]) for ex, row in zip(examples, ids)]
    return sum(found) / len(found)


def _direct_span_recall(knowledge, examples, ids, k):
    """Count by hand: a block among the first k holds the masked word pieces, in order."""
    def holds(seq, run):
        seq, run = list(seq), list(run)
        return any(seq[i:i + len(run)] == run for i in range(len(seq) - len(run) + 1))

    found = [any(holds(knowledge.title_ids(int(b)), ex.target_ids)
                 or holds(knowledge.body_ids(int(b)), ex.target_ids) for b in row[:k])
             for ex, row in zip(examples, ids)]
    return sum(found) / len(found)


def test_oracle_searcher_recall(stores, tokenizer):
    queries, knowledge = stores
    first = title_recall(OracleSearcher(queries, knowledge, tokenizer, 0), queries, knowledge, [1, 5])
    assert first["title_recall@1"] == first["title_recall@5"] == 1.0
    assert first["queries"] == len(queries) and first["queries_without_target"] == 0
    third = title_recall(OracleSearcher(queries, knowledge, tokenizer, 2), queries, knowledge,
                         [1, 2, 3])
    assert (third["title_recall@1"], third["title_recall@2"], third["title_recall@3"]) == (0, 0, 1)


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_real_searcher_matches_a_direct_count(kind, stores, tokenizer, tiny_retriever):
    queries, knowledge = stores
    if kind == "bm25":
        searcher = BM25Searcher(knowledge)
    else:
        from realm.modeling.retriever import Retriever

        searcher = DenseSearcher(Retriever.from_pretrained(tiny_retriever), knowledge, progress=False)
    report = title_recall(searcher, queries, knowledge, [1, 3, 10], seed=5)
    ds = MLMDataset(queries, tokenizer.mask_token_id, seed=5)
    examples = [ds[i] for i in range(len(ds))]
    if kind == "bm25":
        texts = masked_query_texts(tokenizer, examples)
        assert all("[MASK]" not in t for t in texts)
        ids = searcher.search_texts(texts, 10)
    else:
        ids = searcher.search_ids([ex.query_ids for ex in examples], 10)
    for k in (1, 3, 10):
        assert report[f"title_recall@{k}"] == pytest.approx(
            _direct_recall(queries, knowledge, examples, ids, k), abs=1e-4)
        assert report[f"span_recall@{k}"] == pytest.approx(
            _direct_span_recall(knowledge, examples, ids, k), abs=1e-4)
    if kind == "bm25":  # BM25 finds blocks that hold the masked words for some queries
        assert report["span_recall@10"] > 0
    assert report["random_recall@1"] < 0.2
    if kind == "bm25":  # a lead sentence shares its subject's words with the 2015 article
        assert report["title_recall@3"] > 0.5


def test_random_recall_and_no_target(stores, signal_dir):
    assert random_recall(np.array([1]), 100, 5) == pytest.approx(0.05)
    assert random_recall(np.array([2]), 4, 1) == pytest.approx(0.5)
    assert random_recall(np.array([2]), 4, 3) == pytest.approx(1.0)
    queries, _ = stores
    other = BlockStore(signal_dir / "x_train")  # held-out titles are never training titles
    with pytest.raises(ValueError, match="no query .* has a same-titled article"):
        title_recall(BM25Searcher(other), queries, other, [1])


def test_cli_title_recall(signal_dir, tiny_retriever):
    def run(*args):  # the BM25 path of the CLI is the same call with another searcher
        proc = subprocess.run(
            [sys.executable, str(REPO / "launch" / "evaluate.py"), "title-recall",
             "--queries", str(signal_dir / "x_heldout"), "--corpus", str(signal_dir / "z"),
             "--k", "1,5", "--no-progress", *args],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    dense = run("--retriever", tiny_retriever, "--masking", "random_token", "--limit", "4")
    assert dense["mode"] == "title-recall" and dense["retriever"] == tiny_retriever
    assert dense["masking"] == "random_token" and dense["fallback_queries"] == 0
    assert dense["queries"] == 4 and dense["blocks"] == len(BlockStore(signal_dir / "z"))
    assert 0 <= dense["title_recall@1"] <= dense["title_recall@5"] <= 1
    assert set(dense) >= {"random_recall@5", "queries_without_target", "seconds"}
    # --compare-with: the same queries under a second retriever (here the same one: no change)
    both = run("--retriever", tiny_retriever, "--limit", "4", "--compare-with", tiny_retriever)
    paired = both["paired"]
    assert paired["before"] == tiny_retriever and set(paired) == {"before", "title", "span"}
    for k in ("1", "5"):
        assert paired["title"][k]["after"] == both[f"title_recall@{k}"]
        assert paired["span"][k]["before"] == both[f"span_recall@{k}"]
        assert paired["title"][k]["gained"] == paired["title"][k]["lost"] == 0
        assert paired["title"][k]["p_value"] == 1.0
