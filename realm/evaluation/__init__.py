"""Evaluation: SQuAD answer normalisation, EM/F1, regex answers, recall@k, a BM25 baseline."""

from realm.evaluation.answers import (
    compile_answer_pattern,
    exact_match,
    f1_score,
    has_answer,
    normalize_answer,
)
from realm.evaluation.bm25 import BM25Retriever
from realm.evaluation.retrieval import answer_hits, gold_hits, recall_at_k

__all__ = [
    "BM25Retriever",
    "answer_hits",
    "compile_answer_pattern",
    "exact_match",
    "f1_score",
    "gold_hits",
    "has_answer",
    "normalize_answer",
    "recall_at_k",
]
