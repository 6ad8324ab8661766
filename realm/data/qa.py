"""QA files: jsonl of ``{question, answers}`` (or NQ-open's ``answer``), optional ``gold_passage``."""

from __future__ import annotations

import dataclasses
import json
from typing import Optional


class QAFormatError(ValueError):
    """A QA record is malformed; the message names the file and line."""


@dataclasses.dataclass
class QAExample:
    question: str
    answers: list[str]
    gold_passage: Optional[str] = None
    id: Optional[str] = None


def read_qa(path: str, limit: Optional[int] = None) -> list[QAExample]:
    """Read a QA jsonl file; every bad record is an error naming ``path:line``."""
    out: list[QAExample] = []
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
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise QAFormatError(f"{where}: malformed JSON: {err.msg}") from None
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
            gold = rec.get("gold_passage")
            out.append(QAExample(question.strip(), answers, None if gold is None else str(gold),
                                 None if rec.get("id") is None else str(rec["id"])))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise QAFormatError(f"{path}: no QA records")
    return out
