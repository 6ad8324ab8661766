"""The generative Open-QA model (RAG, Lewis et al. 2020): a retriever over a fixed index, and a
causal-LM generator that reads the top k blocks' cased text.

The document index stays fixed (as for the extractive :class:`realm.modeling.openqa.OpenQAModel`,
whose retrieval it shares); the query encoder and the generator (``frozen``, ``lora`` or
``full``) train. Per question x::

    f(x, z), top-k = retrieve_blocks(x)              dense: gradients reach the query encoder
    p(z|x) = softmax(f(x, z) / T)                    over the k blocks (BM25: constants)
    log p(a_t | z, x, a_<t)                          the generator after "title\\nbody\\n\\n
                                                     Question: x\\nAnswer:", each gold answer a
    loss = -log Σ_a Σ_z p(z|x) Π_t p(a_t|z, x, a_<t)           RAG-Sequence
         = -log Σ_a Π_t Σ_z p(z|x) p(a_t|z, x, a_<t)           RAG-Token

Answers are written by :func:`realm.modeling.rag.decode` (greedy, beam, thorough, fast). Closed
book (the baseline): no retrieval, the generator reads ``Question: x\\nAnswer:`` alone. Saving
and loading are in :mod:`realm.retrieval.fixed`, beside the extractive model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from realm.data.store import BlockStore
from realm.index.mips import SearchResult
from realm.metrics import has_answer
from realm.modeling.embed import special_ids
from realm.modeling.openqa import freeze_for_fixed_index, query_reps, retrieve_blocks
from realm.modeling.rag.decode import METHODS, Decoded, decode
from realm.modeling.rag.generator import RAGGenerator
from realm.modeling.rag.losses import rag_sequence_log_likelihood, rag_token_log_likelihood
from realm.modeling.rag.prompts import Block
from realm.modeling.retriever import Retriever

#: ``log p(answers|x)`` ``[B]`` of each RAG objective (``openqa.rag_loss``).
LOG_LIKELIHOODS = {"sequence": rag_sequence_log_likelihood, "token": rag_token_log_likelihood}


@dataclass
class RAGOutput:
    """What one forward returns (the answer terms only when answers are given).

    Attributes:
        block_ids: Blocks read, ``[B, k]`` (-1: no block, the closed-book prompt).
        retrieval_logits: ``f(x, z)`` of those blocks, ``[B, k]`` (zeros in closed book).
        token_log_probs: ``[B, A, k, T]`` the scored answers' token log-probabilities.
        answer_mask: ``[B, A]`` the real answers among them.
        answers: The gold answers scored (:meth:`GenerativeOpenQAModel.train_answers`).
        has_answer: ``[B, k]`` bool: the blocks whose title or text holds a gold answer.
        log_likelihood: ``[B]`` ``log p(answers|x)`` under the RAG objective.
        loss: ``-mean(log_likelihood)``.
    """

    block_ids: np.ndarray
    retrieval_logits: torch.Tensor
    token_log_probs: Optional[torch.Tensor] = None
    answer_mask: Optional[torch.Tensor] = None
    answers: Optional[list[list[str]]] = None
    has_answer: Optional[torch.Tensor] = None
    log_likelihood: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None


class GenerativeOpenQAModel(nn.Module):
    """Retriever (query encoder; None for BM25 or closed book) over a fixed index, and a RAG
    generator.

    Args:
        retriever: Dense retriever whose document encoder built ``index``; None with BM25 and in
            closed book.
        generator: The :class:`realm.modeling.rag.RAGGenerator`.
        index: :class:`realm.retrieval.fixed.DenseIndex` or
            :class:`realm.retrieval.fixed.BM25Index` over ``store``; None in closed book.
        store: The knowledge corpus.
        k: Blocks read per question.
        max_question_tokens: Word pieces of a question the query encoder reads.
        rag_loss: ``sequence`` or ``token``.
        decoding: One of :data:`realm.modeling.rag.METHODS`.
        beam_size: Beams of ``beam``, ``thorough`` and ``fast``.
        max_answer_tokens: The most generator tokens in a written answer (its stop included).
        max_train_answers: Gold answers scored per training question.
        closed_book: No retrieval: the generator alone.
        train_query_encoder: Let gradients reach the query encoder.
        train_doc_encoder: Let gradients reach the document encoder (an index the refresher
            keeps fresh, :class:`realm.retrieval.fixed.LiveIndex`: RAG-end2end).
        retrieval_temperature: ``p(z|x) = softmax(f(x, z) / T)``.
        regex: Answers are regular expressions (evaluation only: the generator trains on
            strings).
    """

    reader_type = "generative"

    def __init__(self, retriever: Optional[Retriever], generator: RAGGenerator, index,
                 store: BlockStore, *, k: int = 5, max_question_tokens: int = 48,
                 rag_loss: str = "sequence", decoding: str = "greedy", beam_size: int = 4,
                 max_answer_tokens: int = 16, max_train_answers: int = 2,
                 closed_book: bool = False, train_query_encoder: bool = True,
                 train_doc_encoder: bool = False, retrieval_temperature: float = 1.0,
                 regex: bool = False):
        super().__init__()
        if rag_loss not in LOG_LIKELIHOODS:
            raise ValueError(f"rag_loss must be one of {tuple(LOG_LIKELIHOODS)}, got {rag_loss!r}")
        if decoding not in METHODS:
            raise ValueError(f"decoding must be one of {METHODS}, got {decoding!r}")
        if retrieval_temperature <= 0:
            raise ValueError(f"retrieval_temperature must be > 0, got {retrieval_temperature}")
        if min(k, beam_size, max_answer_tokens, max_train_answers) < 1:
            raise ValueError("k, beam_size, max_answer_tokens and max_train_answers must be >= 1")
        if closed_book:
            retriever, index = None, None
        elif index is None:
            raise ValueError("a generative model with retrieval needs an index (or closed_book)")
        self.retriever, self.generator, self.index, self.store = retriever, generator, index, store
        self.k, self.max_question_tokens = k, max_question_tokens
        self.rag_loss, self.decoding, self.beam_size = rag_loss, decoding, beam_size
        self.max_answer_tokens, self.max_train_answers = max_answer_tokens, max_train_answers
        self.closed_book, self.regex = closed_book, regex
        self.retrieval_temperature = retrieval_temperature
        self.tokenizer = retriever.tokenizer if retriever is not None else None  # word pieces
        self.special = special_ids(self.tokenizer) if retriever is not None else None
        if retriever is not None:
            freeze_for_fixed_index(retriever, train_query_encoder, train_doc_encoder)

    @property
    def dense(self) -> bool:
        return self.retriever is not None

    @property
    def blocks_read(self) -> int:
        """Blocks read per question: ``k`` (1, the closed-book prompt, in closed book)."""
        return 1 if self.closed_book else min(self.k, len(self.store))

    def retrieve(self, questions: Sequence[str], k: int) -> SearchResult:
        """Top-``k`` blocks (at most the corpus): retrieval logits ``[B, k]`` (with grad to the
        query encoder over a dense index) and block ids ``[B, k]``; in closed book one "block"
        of id -1 and logit 0 per question."""
        if self.closed_book:
            return SearchResult(torch.zeros(len(questions), 1),
                                np.full((len(questions), 1), -1, np.int64))
        return retrieve_blocks(self.retriever, self.index, questions,
                               self._question_ids(questions) if self.dense else None,
                               min(k, len(self.store)), self.special, self.max_question_tokens)

    def _question_ids(self, questions: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(q, add_special_tokens=False)["input_ids"][
            : self.max_question_tokens] for q in questions]

    def block_logits(self, questions: Sequence[str], block_ids: np.ndarray) -> torch.Tensor:
        """``f(x, z)`` ``[B, k]`` of given blocks: ``q . e`` over a dense index (with grad to
        the query encoder), zeros with BM25 and in closed book."""
        if not self.dense or self.closed_book:
            return torch.zeros(block_ids.shape)
        q = query_reps(self.retriever, self._question_ids(questions), self.special,
                       self.max_question_tokens)
        return self.index.scores(q, block_ids)

    def blocks(self, block_ids: np.ndarray) -> list[list[Block]]:
        """``(title, text)`` of each block, cased as in the corpus (None for -1)."""
        return [[None if b < 0 else (self.store.title(int(b)), self.store.text(int(b)))
                 for b in row] for row in block_ids]

    def prior_logits(self, retrieval_logits: torch.Tensor) -> torch.Tensor:
        """``f(x, z) / T``: the logits of ``p(z|x)``, ``[B, k]``."""
        return retrieval_logits.float() / self.retrieval_temperature

    def block_has_answer(self, block_ids: np.ndarray, answers: Sequence[Sequence[str]]
                         ) -> np.ndarray:
        """``[B, k]`` bool: blocks whose title or text holds one of the question's answers."""
        return np.array([[b >= 0 and has_answer(
            f"{self.store.title(int(b))} {self.store.text(int(b))}", golds, regex=self.regex)
            for b in row] for row, golds in zip(block_ids, answers)], dtype=bool).reshape(
            block_ids.shape)

    def train_answers(self, answers: Sequence[Sequence[str]], block_ids: np.ndarray
                      ) -> list[list[str]]:
        """The gold answers scored for each question: at most ``max_train_answers``, those that
        fit in ``max_answer_tokens`` (else the shortest one), those found in the question's
        blocks first, then in the given order."""
        out = []
        for golds, row in zip(answers, block_ids):
            golds = list(dict.fromkeys(a.strip() for a in golds if a.strip()))
            if not golds:
                raise ValueError("a training question has no answer")
            lengths = [len(ids) for ids in self.generator.prompts.answer_ids(golds)]
            fit = [a for a, n in zip(golds, lengths) if n <= self.max_answer_tokens]
            if not fit:
                fit = [golds[int(np.argmin(lengths))]]
            texts = [f"{self.store.title(int(b))} {self.store.text(int(b))}" for b in row if b >= 0]
            found = [a for a in fit if any(has_answer(t, [a]) for t in texts)]
            out.append((found + [a for a in fit if a not in found])[: self.max_train_answers])
        return out

    def forward(self, questions: Sequence[str], answers: Optional[Sequence[Sequence[str]]] = None,
                block_ids: Optional[np.ndarray] = None,
                retrieval_logits: Optional[torch.Tensor] = None) -> RAGOutput:
        """Retrieve (unless ``block_ids`` are given; their ``retrieval_logits`` then default to
        :meth:`block_logits`) and, with gold answers, score them beside each block: the RAG
        loss.

        Raises:
            ValueError: Regular-expression answers (the generator scores strings), or a question
                that is empty or too long for the generator (the message names it).
        """
        if block_ids is None:
            retrieval_logits, block_ids = self.retrieve(questions, self.k)
        elif retrieval_logits is None:
            retrieval_logits = self.block_logits(questions, block_ids)
        out = RAGOutput(block_ids=block_ids, retrieval_logits=retrieval_logits)
        if answers is None:
            return out
        if self.regex:
            raise ValueError("the generative reader trains on answer strings, not regular "
                             "expressions (openqa.regex)")
        out.answers = self.train_answers(answers, block_ids)
        scores = self.generator.score(questions, self.blocks(block_ids), out.answers)
        out.token_log_probs, out.answer_mask = scores.token_log_probs, scores.answer_mask
        prior = self.prior_logits(retrieval_logits).to(scores.token_log_probs.device)  # [B, k]
        out.log_likelihood = LOG_LIKELIHOODS[self.rag_loss](prior, scores.token_log_probs,
                                                           scores.answer_mask)  # [B]
        out.loss = -out.log_likelihood.mean()
        out.has_answer = torch.from_numpy(self.block_has_answer(block_ids, answers))
        return out

    @torch.no_grad()
    def generate(self, questions: Sequence[str], block_ids: Optional[np.ndarray] = None,
                 retrieval_logits: Optional[torch.Tensor] = None) -> tuple[Decoded, SearchResult]:
        """Write an answer to each question over its top ``k`` blocks (retrieved unless given),
        by the model's ``decoding``.

        Returns:
            ``(decoded, (retrieval_logits, block_ids))``: the answers, their ``log p(y|x)`` and
            ``p(z|x, y)`` ``[B, k]`` (:class:`realm.modeling.rag.Decoded`), and the blocks read.
        """
        if block_ids is None:
            retrieval_logits, block_ids = self.retrieve(questions, self.k)
        decoded = decode(self.generator, questions, self.blocks(block_ids),
                         self.prior_logits(retrieval_logits).detach(), method=self.decoding,
                         beam_size=self.beam_size, max_answer_tokens=self.max_answer_tokens)
        return decoded, SearchResult(retrieval_logits, block_ids)
