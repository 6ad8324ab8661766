"""QA data: jsonl of ``{question, answers}`` (or NQ-open's ``answer``), optional ``gold_passage``.

CuratedTREC-style files hold regular expressions as answers (``regex=True``: each is compiled,
and a bad pattern is an error naming its line). ``hf:NAME[/CONFIG]:SPLIT`` reads a
``datasets`` split instead of a file (network or local cache permitting).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterable, Optional


class QAFormatError(ValueError):
    """A QA record is malformed; the message names the file and line."""


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
