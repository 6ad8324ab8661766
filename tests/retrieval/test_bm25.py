"""BM25 baseline: tiny hand-checked corpora and recall on real SQuAD-open passages."""

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from realm.retrieval.bm25 import BM25Retriever
from realm.metrics import gold_hits, recall_at_k

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SQUAD = DATA / "squad_open"
N_PASSAGES = 300

TOY = [
    "The cat sat on the mat.",
    "Dogs bark at the mailman every morning.",
    "A quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
]


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def squad_subset() -> tuple[list[dict], list[dict]]:
    """The first 300 passages and the train questions whose gold passage is among them."""
    if not (SQUAD / "passages.jsonl").is_file():
        pytest.skip(f"{SQUAD} is not present")
    passages = _read_jsonl(SQUAD / "passages.jsonl")[:N_PASSAGES]
    ids = {p["id"] for p in passages}
    questions = [q for q in _read_jsonl(SQUAD / "qa_train.jsonl") if q["gold_passage"] in ids]
    return passages, questions


@pytest.fixture(scope="module")
def squad_retriever(squad_subset) -> BM25Retriever:
    passages, _ = squad_subset
    return BM25Retriever.build([p["text"] for p in passages])


def test_toy_search_ranks_and_dtypes():
    retriever = BM25Retriever.build(TOY)
    scores, indices = retriever.search(["capital of France", "lazy fox", "barking dogs"], k=2)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    assert scores.shape == indices.shape == (3, 2)
    assert indices[:, 0].tolist() == [3, 2, 1]
    assert np.all(scores[:, 0] >= scores[:, 1])
    assert scores[0, 0] > 0 and scores[0, 1] == 0  # only passage 3 shares a word


def test_unknown_and_stopword_queries_score_zero():
    retriever = BM25Retriever.build(TOY)
    scores, _ = retriever.search(["zebra", "the of a"], k=4)
    np.testing.assert_array_equal(scores, np.zeros((2, 4), dtype=np.float32))


def test_k_clamped_to_corpus_size_with_warning(caplog):
    retriever = BM25Retriever.build(TOY)
    with caplog.at_level(logging.WARNING, logger="realm.retrieval.bm25"):
        scores, indices = retriever.search(["cat"], k=10)
    assert indices.shape == (1, len(TOY)) and sorted(indices[0].tolist()) == [0, 1, 2, 3]
    assert "k=10" in caplog.text and "only 4 passages" in caplog.text


def test_invalid_arguments():
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Retriever.build([])
    with pytest.raises(ValueError, match="k must be >= 1"):
        BM25Retriever.build(TOY).search(["cat"], k=0)
    scores, indices = BM25Retriever.build(TOY).search([], k=2)
    assert scores.shape == indices.shape == (0, 2)


@pytest.mark.skipif(importlib.util.find_spec("Stemmer") is not None, reason="PyStemmer installed")
def test_stemming_needs_pystemmer():
    with pytest.raises(ImportError, match="PyStemmer"):
        BM25Retriever.build(TOY, stem=True)


def test_squad_gold_passage_recall(squad_subset, squad_retriever):
    passages, questions = squad_subset
    position = {p["id"]: i for i, p in enumerate(passages)}
    _, indices = squad_retriever.search([q["question"] for q in questions], k=20)
    hits = gold_hits(indices, [position[q["gold_passage"]] for q in questions])
    recall = recall_at_k(hits, [1, 20])
    # Measured with bm25s 0.3.16, k1=0.9, b=0.4, English stop words, no stemming, on the
    # 1,736 such questions: recall@1 = 0.650, recall@20 = 0.945. Floors sit 0.15 below.
    assert len(questions) == 1736
    assert recall["20"] > 0.79
    assert recall["1"] > 0.50


def test_squad_passage_text_retrieves_itself_first(squad_subset, squad_retriever):
    passages, _ = squad_subset
    _, indices = squad_retriever.search([p["text"] for p in passages], k=1)
    np.testing.assert_array_equal(indices[:, 0], np.arange(len(passages)))
