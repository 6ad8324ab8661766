"""Retrieval metrics: hit matrices (answer or gold-passage hits) and recall@k.

A *hit matrix* is a boolean array ``[n_queries, max_k]`` whose entry ``[q, r]`` says whether the
passage retrieved at rank ``r`` (0-based) for query ``q`` is relevant. :func:`answer_hits` builds
it from passage texts (DPR's "top-k accuracy": the passage contains an answer),
:func:`gold_hits` from passage ids, and :func:`recall_at_k` reduces it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Iterable, Sequence

import numpy as np

from realm.evaluation.answers import has_answer


def recall_at_k(hits: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
    """Fraction of queries with at least one hit among their first ``k`` results, for each k.

    Args:
        hits: Boolean hit matrix ``[n_queries, max_k]`` (rank order along axis 1).
        ks: Cut-offs, each in ``1..max_k``.

    Returns:
        ``{str(k): recall}`` in the order of ``ks``, e.g. ``{"1": 0.4, "5": 0.8}``.

    Raises:
        ValueError: ``hits`` is not 2-D or has no rows, or a k is < 1 or > ``max_k``.
    """
    hits = np.asarray(hits, dtype=bool)
    if hits.ndim != 2 or hits.shape[0] == 0:
        raise ValueError(f"hits must be a non-empty [n_queries, max_k] matrix, got {hits.shape}")
    # cumulative[q, r]: query q has a hit at some rank <= r (a running OR along the ranks).
    cumulative = np.logical_or.accumulate(hits, axis=1)  # [n_queries, max_k]
    result = {}
    for k in ks:
        if not 1 <= k <= hits.shape[1]:
            raise ValueError(f"k={k} is outside 1..{hits.shape[1]} (the columns of hits)")
        result[str(k)] = float(cumulative[:, k - 1].mean())
    return result


def paired_recall(before: np.ndarray, after: np.ndarray,
                  ks: Iterable[int]) -> dict[str, dict[str, float]]:
    """Two retrievers on the same queries: per k, the queries each hits that the other misses,
    and the exact two-sided sign test (McNemar) of "neither is better".

    Args:
        before, after: Boolean hit matrices ``[n_queries, max_k]`` of the same queries, in the
            same order.
        ks: Cut-offs, each in ``1..max_k`` of both.

    Returns:
        ``{str(k): {"before", "after" (recall), "gained" (queries only ``after`` hits),
        "lost" (only ``before``), "p_value"}}``.

    Raises:
        ValueError: The matrices hold different numbers of queries (or as :func:`recall_at_k`).
    """
    before, after = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    if before.shape[0] != after.shape[0]:
        raise ValueError(f"before has {before.shape[0]} queries, after {after.shape[0]}")
    ks = list(ks)
    r_before, r_after = recall_at_k(before, ks), recall_at_k(after, ks)
    a = np.logical_or.accumulate(before, axis=1)
    b = np.logical_or.accumulate(after, axis=1)
    out = {}
    for k in ks:
        gained = int((~a[:, k - 1] & b[:, k - 1]).sum())
        lost = int((a[:, k - 1] & ~b[:, k - 1]).sum())
        n = gained + lost
        tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n
        out[str(k)] = {"before": round(r_before[str(k)], 4), "after": round(r_after[str(k)], 4),
                       "gained": gained, "lost": lost, "p_value": round(min(1.0, 2 * tail), 6)}
    return out


def compare_predictions(before: str, after: str) -> dict[str, object]:
    """Two Open-QA systems' ``predictions-*.jsonl`` (``launch/evaluate.py openqa``, or a
    fine-tune's ``predictions-dev.jsonl``) on the same questions: exact match and F1 of each,
    and per question the exact-match gains and losses with the exact sign test of :func:`paired_recall`.

    Raises:
        ValueError: A file has a line that is not a prediction record (named by file and line),
            or the files hold different questions or a different order (the first difference
            is named).
    """
    import json

    def read(path: str) -> list[dict]:
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rows.append({"question": row["question"],
                                 "exact_match": bool(row["exact_match"]),
                                 "f1": float(row["f1"])})
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{n}: not a prediction record "
                                     f"(question, exact_match, f1): {err}") from None
        return rows

    a, b = read(before), read(after)
    if len(a) != len(b):
        raise ValueError(f"{before} holds {len(a)} predictions, {after} {len(b)}")
    for n, (x, y) in enumerate(zip(a, b), 1):
        if x["question"] != y["question"]:
            raise ValueError(f"{before}:{n} and {after}:{n} are different questions "
                             f"({x['question']!r}, {y['question']!r})")
    if not a:
        raise ValueError(f"{before}: no predictions")
    em = paired_recall(np.array([r["exact_match"] for r in a], dtype=bool)[:, None],
                       np.array([r["exact_match"] for r in b], dtype=bool)[:, None], [1])["1"]
    return {"questions": len(a), "exact_match": em,
            "f1": {"before": round(float(np.mean([r["f1"] for r in a])), 4),
                   "after": round(float(np.mean([r["f1"] for r in b])), 4)}}


def answer_hits(
    retrieved_texts: Sequence[Sequence[str]],
    answers: Sequence[Sequence[str]],
    regex: bool = False,
) -> np.ndarray:
    """Hit matrix from passage texts: does the passage at each rank contain an answer?

    Args:
        retrieved_texts: Per query, the retrieved passage texts in rank order.
        answers: Per query, its gold answers (strings, or patterns when ``regex``).
        regex: Answers are regular expressions (see :func:`realm.evaluation.answers.has_answer`).

    Returns:
        Boolean array ``[n_queries, max_k]``, ``max_k`` the longest result list; shorter lists
        are padded with False (a missing result is not a hit).

    Raises:
        ValueError: The two lists differ in length, or an answer list is empty / a regex invalid.
    """
    _check_same_length(retrieved_texts, answers, "retrieved_texts", "answers")
    rows = [
        [has_answer(text, ans, regex=regex) for text in texts]
        for texts, ans in zip(retrieved_texts, answers)
    ]
    return _pad_rows(rows)


def gold_hits(
    retrieved_ids: Sequence[Sequence[Hashable]] | np.ndarray,
    gold_ids: Sequence[Hashable | Collection[Hashable]],
) -> np.ndarray:
    """Hit matrix from passage ids: is the passage at each rank a gold passage?

    Args:
        retrieved_ids: Per query, the retrieved passage ids in rank order (a list of lists or an
            ``[n_queries, k]`` array).
        gold_ids: Per query, one gold id, or a collection (list/set/tuple) of gold ids.
            A string counts as one id.

    Returns:
        Boolean array ``[n_queries, max_k]``, padded with False like :func:`answer_hits`.

    Raises:
        ValueError: The two lists differ in length.
    """
    _check_same_length(retrieved_ids, gold_ids, "retrieved_ids", "gold_ids")
    rows = []
    for ids, gold in zip(retrieved_ids, gold_ids):
        gold_set = _as_id_set(gold)
        rows.append([_to_key(i) in gold_set for i in ids])
    return _pad_rows(rows)


def _as_id_set(gold: Hashable | Collection[Hashable]) -> set[Hashable]:
    if isinstance(gold, (str, bytes)) or not isinstance(gold, (Collection, np.ndarray)):
        return {_to_key(gold)}
    return {_to_key(g) for g in gold}


def _to_key(x: Hashable) -> Hashable:
    # numpy scalars (np.int64 from a search result) compare equal to Python ints but keep
    # the code explicit about it.
    return x.item() if isinstance(x, np.generic) else x


def _pad_rows(rows: list[list[bool]]) -> np.ndarray:
    max_k = max((len(r) for r in rows), default=0)
    out = np.zeros((len(rows), max_k), dtype=bool)  # [n_queries, max_k]
    for q, row in enumerate(rows):
        out[q, : len(row)] = row
    return out


def _check_same_length(a: Sequence, b: Sequence, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} queries but {name_b} has {len(b)}")
