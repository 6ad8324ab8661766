"""QA data: jsonl of ``{question, answers}`` (or NQ-open's ``answer``), optional ``gold_passage``.

CuratedTREC-style files hold regular expressions as answers (``regex=True``: each is compiled,
and a bad pattern is an error naming its line). ``hf:NAME[/CONFIG]:SPLIT`` reads a
``datasets`` split instead of a file (network or local cache permitting).

Batches of tokenized questions (:class:`QADataset`, :func:`collate_qa`) and the original text of
blocks behind word-piece spans (:class:`BlockTexts`) feed the Open-QA model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from realm.data.store import BlockStore
from realm.errors import QAFormatError
from realm.metrics import compile_answer_pattern


@dataclasses.dataclass
class QAExample:
    question: str
    answers: list[str]
    gold_passage: Optional[str] = None
    id: Optional[str] = None


def read_qa(path: str, limit: Optional[int] = None, regex: bool = False) -> list[QAExample]:
    """Read QA records; every bad record is an error naming ``path:line`` (or the row).

    Args:
        path: A jsonl file, or ``hf:NAME[/CONFIG]:SPLIT`` for a ``datasets`` split.
        limit: Keep the first ``limit`` records.
        regex: The answers are regular expressions (CuratedTREC); each must compile.
    """
    out: list[QAExample] = []
    for where, rec in _records(path):
        out.append(_example(rec, where, regex))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise QAFormatError(f"{path}: no QA records")
    return out


def _records(path: str) -> Iterable[tuple[str, Any]]:
    """``(where, record)`` pairs of a jsonl file or a ``datasets`` split."""
    if path.startswith("hf:"):
        yield from _hf_records(path)
        return
    try:
        f = open(path, "rb")
    except OSError as err:
        raise QAFormatError(f"{path}: cannot open: {err}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise QAFormatError(f"{where}: invalid UTF-8 at byte {err.start}") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise QAFormatError(f"{where}: malformed JSON: {err.msg}") from None


def _hf_records(spec: str) -> Iterable[tuple[str, Any]]:
    name, _, split = spec[3:].rpartition(":")
    if not name or not split:
        raise QAFormatError(f"{spec}: expected hf:NAME[/CONFIG]:SPLIT, e.g. hf:nq_open:validation")
    name, _, config = name.partition("/")
    try:
        import datasets

        rows = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # offline, unknown name, ...: say which and why
        raise QAFormatError(f"{spec}: cannot load the dataset: {err}") from None
    for i, row in enumerate(rows):
        answers = row.get("answers", row.get("answer"))
        if isinstance(answers, dict):  # TriviaQA {"value", "aliases"}, SQuAD {"text", ...}
            answers = answers.get("aliases") or answers.get("text") or answers.get("value")
        yield f"{spec} row {i}", {**row, "answers": answers}


def _example(rec: Any, where: str, regex: bool) -> QAExample:
    if not isinstance(rec, dict):
        raise QAFormatError(f"{where}: expected an object with question and answers")
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        raise QAFormatError(f"{where}: field 'question' is missing or empty")
    answers = rec.get("answers", rec.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)):
        raise QAFormatError(f"{where}: field 'answers' must be a non-empty list of strings")
    if regex:
        for a in answers:
            try:
                re.compile(a)
            except re.error as err:
                raise QAFormatError(f"{where}: answer {a!r} is not a valid regular expression: "
                                    f"{err}") from None
    gold = rec.get("gold_passage")
    return QAExample(question.strip(), list(answers), None if gold is None else str(gold),
                     None if rec.get("id") is None else str(rec["id"]))


@dataclasses.dataclass
class QABatch:
    """Questions of one batch.

    Attributes:
        questions: Question texts (BM25 searches them).
        question_ids: Word pieces of each question (no special tokens), ``B`` arrays.
        answers: Gold answers of each question (patterns when ``regex``).
        answer_ids: Word pieces of each string answer (empty lists for regex answers).
        indices: Position of each question in its dataset.
    """

    questions: list[str]
    question_ids: list[np.ndarray]
    answers: list[list[str]]
    answer_ids: list[list[np.ndarray]]
    indices: list[int]


class QADataset(torch.utils.data.Dataset):
    """Tokenized questions and answers."""

    def __init__(self, examples: Sequence[QAExample], tokenizer, max_question_tokens: int,
                 regex: bool = False):
        self.examples = list(examples)
        self.tokenizer, self.max_question_tokens, self.regex = tokenizer, max_question_tokens, regex

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[QAExample, np.ndarray, list[np.ndarray], int]:
        ex = self.examples[i]
        tok = self.tokenizer
        q = np.asarray(tok(ex.question, add_special_tokens=False)["input_ids"][
            : self.max_question_tokens], np.int64)
        answers = [] if self.regex else [
            np.asarray(tok(a, add_special_tokens=False)["input_ids"], np.int64)
            for a in ex.answers]
        return ex, q, answers, i


def collate_qa(items) -> QABatch:
    return QABatch([item[0].question for item in items], [item[1] for item in items],
                   [item[0].answers for item in items], [item[2] for item in items],
                   [item[3] for item in items])


class BlockTexts:
    """Original text of block titles and bodies with word-piece character offsets.

    The block store keeps each block's text and its word pieces (the tokenizer's output on that
    text), so a span of word pieces maps back to a substring of the text.
    """

    def __init__(self, store: BlockStore, tokenizer):
        self.store, self.tokenizer = store, tokenizer

    @functools.lru_cache(maxsize=8192)
    def _segment(self, block: int, segment: int) -> tuple[str, np.ndarray]:
        text = self.store.title(block) if segment == 1 else self.store.text(block)
        offsets = self.tokenizer(text, add_special_tokens=False,
                                 return_offsets_mapping=True)["offset_mapping"]
        return text, np.asarray(offsets, np.int64).reshape(-1, 2)  # [n_tokens, 2]

    def span_text(self, block: int, segment: int, start: int, end: int) -> str:
        """Text of word pieces ``start .. end`` (inclusive) of a block's title (1) or body (2)."""
        text, _ = self._segment(block, segment)
        first, last = self.span_chars(block, segment, start, end)
        return text[first:last]

    def span_chars(self, block: int, segment: int, start: int, end: int) -> tuple[int, int]:
        """Character range ``[first, last)`` of word pieces ``start .. end`` (inclusive) in a
        block's title (1) or body text (2)."""
        _, offsets = self._segment(block, segment)
        if end >= len(offsets):  # the tokenizer disagrees with the stored ids: best effort
            end = len(offsets) - 1
        return int(offsets[start, 0]), int(offsets[end, 1])

    def regex_spans(self, block: int, segment: int, n_tokens: int, patterns: Sequence[str],
                    max_width: int, first: int = 0) -> list[tuple[int, int]]:
        """``(start, width - 1)`` of token-aligned matches of the patterns in the ``n_tokens``
        word pieces of a title (1) or body (2) from word piece ``first`` on (``start`` counted
        from ``first``)."""
        text, offsets = self._segment(block, segment)
        offsets = offsets[first: first + n_tokens]
        if not len(offsets):
            return []
        text = text[: offsets[-1, 1]]
        starts = {int(c): i for i, c in enumerate(offsets[:, 0])}
        ends = {int(c): i for i, c in enumerate(offsets[:, 1])}
        found = []
        for pattern in patterns:
            for m in compile_answer_pattern(pattern).finditer(text, int(offsets[0, 0])):
                i, j = starts.get(m.start()), ends.get(m.end())
                if i is not None and j is not None and 0 <= j - i < max_width:
                    found.append((i, j - i))
        return found
