"""Evaluation: SQuAD answer normalisation, EM/F1, regex answers, recall@k, a BM25 baseline."""

from realm.evaluation.answers import (
    compile_answer_pattern,
    exact_match,
    f1_score,
    has_answer,
    normalize_answer,
)

__all__ = [
    "compile_answer_pattern",
    "exact_match",
    "f1_score",
    "has_answer",
    "normalize_answer",
]
