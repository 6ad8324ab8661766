"""Answer matching for Open-QA: SQuAD normalisation, exact match, token F1, regex answers.

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
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections import Counter
from typing import Sequence

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
        if answer_tokens and _contains_run(text_tokens, answer_tokens):
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


def _contains_run(tokens: list[str], run: list[str]) -> bool:
    n = len(run)
    return any(tokens[i : i + n] == run for i in range(len(tokens) - n + 1))


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, (str, bytes)):
        raise TypeError(f"answers must be a sequence of strings, got the string {answers!r}")
    if len(answers) == 0:
        raise ValueError("answers must hold at least one gold answer")
