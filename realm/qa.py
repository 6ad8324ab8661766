"""Ask a fine-tuned Open-QA model questions: ``OpenQA.from_pretrained(RUN/model).answer(q)``.

    from realm import OpenQA
    qa = OpenQA.from_pretrained("runs/openqa-squad/model")
    qa.answer("who wrote hamlet")
    # {"question": ..., "answer": "William Shakespeare", "probability": 0.41, "score": -0.89,
    #  "evidence": [{"title": "Hamlet", "block": 1234, "score": 17.2, "answer_here": True}, ...]}

The model directory (``launch/finetune_openqa.py``'s ``model/``) is self-describing: the reader,
the query encoder with the fixed document embeddings (or BM25), and the corpus it indexes, with
that corpus's fingerprint. The corpus is read from the path the manifest names unless another is
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
from realm.metrics import has_answer
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
    """A fine-tuned retriever + reader over its corpus, answering free-text questions.

    Build it with :meth:`from_pretrained`.

    Args:
        model: The loaded :class:`realm.modeling.openqa.OpenQAModel`.
        directory: The model directory it came from.
    """

    def __init__(self, model, directory: str):
        self.model, self.directory = model.eval(), directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, corpus: Optional[str] = None,
                        progress: bool = False) -> "OpenQA":
        """Load a model directory written by Open-QA fine-tuning.

        Args:
            directory: The ``model/`` directory (or a fine-tuning run directory holding one).
            corpus: The corpus directory; None: the one the model's manifest names.

        Raises:
            FileNotFoundError: No model there.
            CorpusMismatchError: The corpus is missing or is not the one the model indexes.
        """
        directory = os.fspath(directory)
        if (not os.path.isfile(os.path.join(directory, "manifest.json"))
                and os.path.isfile(os.path.join(directory, "model", "manifest.json"))):
            directory = os.path.join(directory, "model")
        manifest = read_manifest(directory, kind=MANIFEST_KIND)
        named = manifest["corpus"]
        path = corpus or named["path"]
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
        model = load_openqa_model(directory, store, progress=progress, precision="fp32")
        return cls(model, directory)

    def answer(self, question: str, k: Optional[int] = None) -> dict[str, Any]:
        """Answer one question: the best span over the top-k blocks, its probability and the
        blocks read (``evidence``, best first by retrieval score)."""
        return self.answer_batch([question], k=k)[0]

    @torch.no_grad()
    def answer_batch(self, questions: Sequence[str], k: Optional[int] = None,
                     batch_size: int = 32) -> list[dict[str, Any]]:
        """Answer many questions, ``batch_size`` at a time.

        Raises:
            ValueError: An empty (or blank) question.
        """
        m = self.model
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"question {i} is empty")
            n = len(m.tokenizer(q, add_special_tokens=False)["input_ids"])
            if n > m.max_question_tokens:
                logger.warning("question %d has %d word pieces: cut to the model's %d", i, n,
                               m.max_question_tokens)
        k_read = k or m.k
        examples = [QAExample(question=q.strip(), answers=["-"]) for q in questions]
        data = QADataset(examples, m.tokenizer, m.max_question_tokens)
        results = []
        for lo in range(0, len(examples), batch_size):
            batch = collate_qa([data[i] for i in range(lo, min(lo + batch_size, len(data)))])
            logits, ids = m.retrieve(batch, k_read)
            out = m(batch, ids, logits, with_loss=False)
            for i, pred in enumerate(m.best_spans(out)):
                evidence = [{"title": m.store.title(int(b)), "block": int(b),
                             "score": round(float(s), 4),
                             "answer_here": bool(pred["prediction"]) and has_answer(
                                 f"{m.store.title(int(b))} {m.store.text(int(b))}",
                                 [pred["prediction"]])}
                            for b, s in zip(ids[i], logits[i].tolist()) if b >= 0]
                results.append({"question": batch.questions[i], "answer": pred["prediction"],
                                "probability": round(float(np.exp(pred["score"])), 4),
                                "score": round(pred["score"], 4),
                                "answer_block": m.store.title(pred["block"]),
                                "evidence": evidence})
        return results
