"""Metrics: answer matching for Open-QA (SQuAD normalisation, exact match, token F1, regex
answers) and retrieval recall@k.

Two questions are answered here, with the conventions of the reference implementations:

* **Is a predicted answer right?** (reader evaluation) — :func:`exact_match` and :func:`f1_score`
  follow the SQuAD v1.1 evaluation script; regex answers (CuratedTREC) follow DrQA's
  ``regex_match_score``: the pattern is compiled with ``IGNORECASE | UNICODE | MULTILINE`` and
  must match **at the start** of the raw prediction (``pattern.match``). It is not anchored at the
  end, so ``\\d{4}`` accepts ``"1990s"`` but not ``"in 1990"``; write ``...$`` in the pattern for a
  full match.
* **Does a passage contain an answer?** (retriever evaluation) — :func:`has_answer` is DPR's
  ``has_answer``: both sides are put in Unicode NFD form and tokenised as DPR's
  ``SimpleTokenizer`` does (:func:`dpr_tokens`: a token is a run of Unicode letters, digits and
  combining marks, or any other single non-space character), uncased; a string answer matches
  when its tokens occur as a contiguous run of the passage's tokens. So ``"cat"`` is found in
  ``"cat-like"`` and ``"the cat's hat"`` but not in ``"concatenate"``; articles count as tokens;
  ``"USA"`` is not found in ``"U.S.A."``. Regexes are searched with ``pattern.search`` anywhere
  in the text, case-insensitive. (Exact match and F1 keep SQuAD's normalisation.)

Unlike DrQA and DPR, which treat an invalid pattern as "no match", an invalid pattern raises a
:class:`ValueError` naming it: a broken answer key should stop an evaluation, not lower its score.

Retrieval metrics: a *hit matrix* is a boolean array ``[n_queries, max_k]`` whose entry
``[q, r]`` says whether the passage retrieved at rank ``r`` (0-based) for query ``q`` is relevant.
:func:`answer_hits` builds it from passage texts (DPR's "top-k accuracy": the passage contains an
answer), :func:`gold_hits` from passage ids, and :func:`recall_at_k` reduces it.
"""

from __future__ import annotations

import functools
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Collection, Hashable, Iterable
from typing import Sequence

import numpy as np
import regex

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_REGEX_FLAGS = re.IGNORECASE | re.UNICODE | re.MULTILINE
#: DPR's SimpleTokenizer: runs of letters, digits and combining marks; any other non-space,
#: non-control character is a token of its own
_DPR_TOKEN = regex.compile(r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]", regex.UNICODE)


def dpr_tokens(text: str, strip_accents: bool = False) -> list[str]:
    """``text`` in NFD form, tokenised as DPR's ``SimpleTokenizer`` and lower-cased.

    Args:
        text: Any text.
        strip_accents: Also drop the combining marks (``"café"`` -> ``"cafe"``); DPR keeps them.

    Returns:
        The tokens, e.g. ``dpr_tokens("The cat's hat") == ["the", "cat", "'", "s", "hat"]``.
    """
    text = unicodedata.normalize("NFD", text)
    if strip_accents:
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    return [t.lower() for t in _DPR_TOKEN.findall(text)]


def normalize_answer(s: str, strip_accents: bool = False) -> str:
    """Normalise an answer string exactly as the SQuAD v1.1 evaluation script does.

    Lower-case, delete ASCII punctuation (``string.punctuation``), replace the articles
    a/an/the by spaces, and collapse runs of whitespace to single spaces.

    Args:
        s: The text to normalise.
        strip_accents: Also remove diacritics (NFD decomposition, then drop combining marks)
            before the SQuAD steps. Off by default, which keeps SQuAD's definition exactly.

    Returns:
        The normalised text, e.g. ``"The  Cat's hat!"`` -> ``"cats hat"``.
    """
    if strip_accents:
        s = _strip_accents(s)
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(
    prediction: str, answers: Sequence[str], regex: bool = False, strip_accents: bool = False
) -> bool:
    """Whether a prediction is correct under any of the gold answers.

    Args:
        prediction: The predicted answer string.
        answers: Gold answers (at least one). With ``regex=True``, regular expressions.
        regex: Treat answers as patterns: correct when ``pattern.match(prediction)`` succeeds
            case-insensitively (DrQA semantics: anchored at the start, not at the end; the
            prediction is not normalised).
        strip_accents: See :func:`normalize_answer` (string answers only).

    Returns:
        True when the normalised prediction equals a normalised answer (or a pattern matches).

    Raises:
        ValueError: ``answers`` is empty, or a pattern does not compile.
        TypeError: ``answers`` is a single string instead of a sequence of strings.
    """
    _check_answers(answers)
    if regex:
        return any(compile_answer_pattern(p).match(prediction) for p in answers)
    pred = normalize_answer(prediction, strip_accents)
    return any(pred == normalize_answer(a, strip_accents) for a in answers)


def f1_score(prediction: str, answers: Sequence[str], strip_accents: bool = False) -> float:
    """SQuAD v1.1 token F1 of a prediction, maximised over the gold answers.

    Tokens are the whitespace-separated words of the normalised strings; overlap is a multiset
    intersection. As in SQuAD v1.1, an empty normalised prediction or answer scores 0.

    Args:
        prediction: The predicted answer string.
        answers: Gold answer strings (at least one).
        strip_accents: See :func:`normalize_answer`.

    Returns:
        The best F1 in [0, 1], e.g. ``"the cat sat"`` vs ``"cat sat down"`` -> 0.8.

    Raises:
        ValueError: ``answers`` is empty.
        TypeError: ``answers`` is a single string.
    """
    _check_answers(answers)
    pred_tokens = normalize_answer(prediction, strip_accents).split()
    return max(_token_f1(pred_tokens, normalize_answer(a, strip_accents).split()) for a in answers)


def has_answer(
    text: str, answers: Sequence[str], regex: bool = False, strip_accents: bool = False
) -> bool:
    """Whether a passage contains any of the answers (DPR's retrieval-accuracy criterion).

    Args:
        text: The passage text.
        answers: Gold answers (at least one). With ``regex=True``, regular expressions.
        regex: Treat answers as patterns searched anywhere in the text (``pattern.search``),
            case-insensitive.
        strip_accents: See :func:`dpr_tokens` (string answers only).

    Returns:
        For strings: True when the :func:`dpr_tokens` of an answer occur as a contiguous run in
        those of the text (whole tokens only). An answer with no token never matches.

    Raises:
        ValueError: ``answers`` is empty, or a pattern does not compile.
        TypeError: ``answers`` is a single string.
    """
    _check_answers(answers)
    text = unicodedata.normalize("NFD", text)
    if regex:
        return any(
            compile_answer_pattern(unicodedata.normalize("NFD", p)).search(text) for p in answers
        )
    text_tokens = dpr_tokens(text, strip_accents)
    for answer in answers:
        answer_tokens = dpr_tokens(answer, strip_accents)
        if answer_tokens and contains_run(text_tokens, answer_tokens):
            return True
    return False


@functools.lru_cache(maxsize=4096)
def compile_answer_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a regex answer with ``IGNORECASE | UNICODE | MULTILINE`` (cached).

    Args:
        pattern: The regular expression, e.g. ``"Long Island|New\\\\s?York"``.

    Returns:
        The compiled pattern.

    Raises:
        ValueError: The pattern does not compile; the message names it.
    """
    try:
        return re.compile(pattern, _REGEX_FLAGS)
    except re.error as err:
        raise ValueError(f"invalid regex answer {pattern!r}: {err}") from err


def _strip_accents(s: str) -> str:
    decomposed = unicodedata.normalize("NFD", s)
    return "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def contains_run(tokens: list[str], run: list[str]) -> bool:
    n = len(run)
    return any(tokens[i : i + n] == run for i in range(len(tokens) - n + 1))


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, (str, bytes)):
        raise TypeError(f"answers must be a sequence of strings, got the string {answers!r}")
    if len(answers) == 0:
        raise ValueError("answers must hold at least one gold answer")


# ---------------------------------------------------------------------------------------------
# Retrieval metrics

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
        regex: Answers are regular expressions (see :func:`realm.metrics.has_answer`).

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
