"""Ask a fine-tuned Open-QA model questions: ``OpenQA.from_pretrained(RUN/model).answer(q)``.

    from realm import OpenQA
    qa = OpenQA.from_pretrained("runs/openqa-squad/model")
    qa.answer("who wrote hamlet")
    # {"question": ..., "answer": "William Shakespeare", "probability": 0.41, "score": -0.89,
    #  "block": 1234, "answer_block": "Hamlet", "field": "text", "start": 52, "end": 71,
    #  "evidence": [{"title": "Hamlet", "block": 1234, "score": 17.2, "probability": 0.93,
    #                "answer_here": True}, ...]}
    qa.answer("who wrote hamlet", min_score=-2.0)   # answer None below the threshold

``start``/``end`` are character offsets of the answer in the block's text (``field`` "text",
``qa.model.store.text(block)[start:end]``) or, for an extractive answer taken from the title, in
its title (``field`` "title").

The model directory (``launch/finetune_openqa.py``'s ``model/``) is self-describing: the reader
(a span reader, or a RAG generator that writes the answer after each block read), the query
encoder with the fixed document embeddings (or BM25), and the corpus it indexes, with that
corpus's fingerprint. The corpus is read from the path the manifest names unless another is
given; a missing corpus, or one whose fingerprint differs, is an error naming both.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch

from realm.artifacts import read_manifest
from realm.data.qa import QADataset, QAExample, collate_qa
from realm.data.store import BlockStore
from realm.errors import CorpusMismatchError
from realm.hub import local_snapshot, locate_corpus
from realm.metrics import has_answer
from realm.modeling.rag import GenerativeOpenQAModel
from realm.retrieval.fixed import MANIFEST_KIND, load_openqa_model

logger = logging.getLogger(__name__)


def read_questions(path: str) -> list[str]:
    """The ``question`` field of every record of a jsonl file (answers are not needed); a bad
    line is an error naming ``path:line``."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not JSON ({err.msg})") from None
            q = rec.get("question") if isinstance(rec, dict) else None
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"{path}:{line_no}: field 'question' is missing or empty")
            questions.append(q)
    return questions


class OpenQA:
    """A fine-tuned retriever + reader (extractive or generative) over its corpus, answering
    free-text questions.

    Build it with :meth:`from_pretrained`.

    Args:
        model: The loaded :class:`realm.modeling.openqa.OpenQAModel` or
            :class:`realm.modeling.rag.GenerativeOpenQAModel`.
        directory: The model directory it came from.
    """

    def __init__(self, model, directory: str):
        self.model, self.directory = model.eval(), directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, corpus: Optional[str] = None,
                        progress: bool = False, precision: str = "auto") -> "OpenQA":
        """Load a model directory written by Open-QA fine-tuning (either kind of reader).

        Args:
            directory: The ``model/`` directory (or a fine-tuning run directory holding one),
                or a Hub id of a pushed model (downloaded once into the Hub cache).
            corpus: The corpus directory; None: the one the model's manifest names (a path
                relative to the model, the path it was saved with, or a Hub datasets
                repository: :func:`realm.hub.locate_corpus`).
            precision: A generative model's generator (and the document encoder, when it
                embeds another corpus): ``auto`` (bf16 where the device runs it fast),
                ``bf16`` or ``fp32``.

        Raises:
            FileNotFoundError: No model there.
            ValueError: A saved directory of another kind (the message names it).
            CorpusMismatchError: The corpus is missing or is not the one the model indexes.
        """
        directory = local_snapshot(os.fspath(directory))  # a Hub id: its downloaded copy
        if (not os.path.isfile(os.path.join(directory, "manifest.json"))
                and os.path.isfile(os.path.join(directory, "model", "manifest.json"))):
            directory = os.path.join(directory, "model")
        manifest = read_manifest(directory, kind=MANIFEST_KIND)
        named = manifest["corpus"]
        path = corpus or locate_corpus(directory, named) or named["path"]
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            raise CorpusMismatchError(
                f"{directory} indexes the corpus {named['path']} (fingerprint "
                f"{named['fingerprint']}), but {path} holds no corpus; give its location with "
                "corpus=... (--corpus)")
        store = BlockStore(path)
        if store.fingerprint != named["fingerprint"]:
            raise CorpusMismatchError(
                f"{directory} indexes the corpus {named['path']} (fingerprint "
                f"{named['fingerprint']}), but {path} is another corpus (fingerprint "
                f"{store.fingerprint})")
        model = load_openqa_model(directory, store, progress=progress, precision=precision)
        return cls(model, directory)

    def answer(self, question: str, k: Optional[int] = None,
               min_score: Optional[float] = None) -> dict[str, Any]:
        """Answer one question: the best span over the top-k blocks, its probability, the block
        it came from with the answer's character offsets there, and the blocks read
        (``evidence``, best first by retrieval score); no answer below ``min_score``
        (:meth:`answer_batch`)."""
        return self.answer_batch([question], k=k, min_score=min_score)[0]

    @torch.no_grad()
    def answer_batch(self, questions: Sequence[str], k: Optional[int] = None,
                     batch_size: int = 32, min_score: Optional[float] = None
                     ) -> list[dict[str, Any]]:
        """Answer many questions, ``batch_size`` at a time.

        Each answer: ``question``, ``answer``, ``score`` (its log-probability), ``probability``,
        ``block`` (the id of the block it came from, or that explains it best; None closed
        book), ``answer_block`` (that block's title), ``field``, ``start`` and ``end`` (the
        answer is ``store.text(block)[start:end]``, or ``store.title(block)[start:end]`` where
        ``field`` is ``title``; a generative answer is looked for in the block's text, then its
        title, case-insensitively; None where it is not there) and ``evidence``: the blocks read,
        best first by retrieval score, each with ``title``, ``block``, ``score`` (retrieval),
        ``probability`` (``p(z|x, y)``: the block's share of the answer) and ``answer_here``
        (its title or text holds the answer).

        ``min_score``: a no-answer threshold on ``score``. Below it ``answer`` (and ``field``,
        ``start``, ``end``) is None and ``no_answer`` is True; ``score``, ``block`` and
        ``evidence`` still say what the best guess was.

        Raises:
            ValueError: An empty (or blank) question, or one too long for a generative model's
                generator (the message names it).
        """
        m = self.model
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"question {i} is empty")
            if m.tokenizer is not None:
                n = len(m.tokenizer(q, add_special_tokens=False)["input_ids"])
                if n > m.max_question_tokens:
                    logger.warning("question %d has %d word pieces: cut to the model's %d", i, n,
                                   m.max_question_tokens)
        questions = [q.strip() for q in questions]
        generative = isinstance(m, GenerativeOpenQAModel)
        if generative:  # every question must fit in the generator's rows with its answer
            m.generator.prompts.prompt_ids(questions, [[None]] * len(questions),
                                           [m.max_answer_tokens] * len(questions))
        results = []
        for lo in range(0, len(questions), batch_size):
            chunk = questions[lo: lo + batch_size]
            answers = (self._generate(chunk, k) if generative else self._extract(chunk, k))
            for question, (answer, score, block, where, evidence) in zip(chunk, answers):
                for e in evidence:
                    e["title"] = m.store.title(e["block"])
                    e["answer_here"] = bool(answer) and has_answer(
                        f"{m.store.title(e['block'])} {m.store.text(e['block'])}", [answer])
                no_answer = min_score is not None and score < min_score
                field, (start, end) = where if where and not no_answer else (None, (None, None))
                results.append({"question": question,
                                "answer": None if no_answer else answer,
                                "probability": round(float(np.exp(score)), 4),
                                "score": round(score, 4), "block": block,
                                "answer_block": None if block is None else m.store.title(block),
                                "field": field, "start": start, "end": end,
                                **({"no_answer": True} if no_answer else {}),
                                "evidence": evidence})
        return results

    def _extract(self, questions: list[str], k: Optional[int]) -> list[tuple]:
        """The extractive model's ``(answer, score, block, (field, (start, end)) or None,
        evidence)`` of each question."""
        m = self.model
        data = QADataset([QAExample(question=q, answers=["-"]) for q in questions], m.tokenizer,
                         m.max_question_tokens)
        batch = collate_qa([data[i] for i in range(len(data))])
        logits, ids = m.retrieve(batch, k or m.k)
        out = m(batch, ids, logits, with_loss=False)
        preds = m.best_spans(out)
        posteriors = m.answer_posteriors(out, preds)  # [B, k]
        return [(pred["prediction"], pred["score"], pred["block"],
                 (pred["field"], pred["chars"]) if pred.get("chars") else None,
                 _evidence(ids[i], logits[i], posteriors[i]))
                for i, pred in enumerate(preds)]

    def _generate(self, questions: list[str], k: Optional[int]) -> list[tuple]:
        """The generative model's ``(answer, score, block, (field, (start, end)) or None,
        evidence)`` of each question."""
        m = self.model
        logits, ids = m.retrieve(questions, k or m.k)
        decoded, _ = m.generate(questions, ids, logits)
        out = []
        for i, answer in enumerate(decoded.answers):
            evidence = [] if m.closed_book else _evidence(ids[i], logits[i], decoded.posteriors[i])
            block = (None if m.closed_book
                     else int(ids[i][int(decoded.posteriors[i].argmax())]))
            where = None
            if block is not None:
                where = next(((field, chars) for field, text in
                              (("text", m.store.text(block)), ("title", m.store.title(block)))
                              if (chars := answer_offsets(text, answer)) is not None), None)
            out.append((answer, float(decoded.scores[i]), block, where, evidence))
        return out


def answer_offsets(text: str, answer: str) -> Optional[tuple[int, int]]:
    """``(start, end)`` of the first occurrence of ``answer`` in ``text`` (exact, else ignoring
    case), or None where it does not occur (or is blank)."""
    answer = answer.strip() if answer else ""
    if not answer:
        return None
    start = text.find(answer)
    if start < 0:
        lowered = text.lower()
        if len(lowered) != len(text):  # lower() changed the length: offsets would not map back
            return None
        start = lowered.find(answer.lower())
    return None if start < 0 else (start, start + len(answer))


def _evidence(ids: np.ndarray, logits: torch.Tensor, posteriors: torch.Tensor
              ) -> list[dict[str, Any]]:
    """The blocks read (ids ``[k]``, retrieval logits ``[k]``, ``p(z|x, y)`` ``[k]``) as
    evidence records (``title`` and ``answer_here`` are filled in by the caller)."""
    return [{"title": "", "block": int(b), "score": round(float(s), 4),
             "probability": round(float(p), 4)}
            for b, s, p in zip(ids, logits.tolist(), posteriors.tolist()) if b >= 0]
