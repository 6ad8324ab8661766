"""The Open-QA model (REALM, Guu et al. 2020, section 3.4): a retriever over a fixed index, and
a span reader.

The document index is built once from the (pretrained) document encoder and stays fixed; the
query encoder and the reader train. Per question x::

    q = Embed_input(x)                               (dense; BM25 has no parameters)
    top-k = MIPS(q.detach(), fixed index)            k = 5 in REALM
    f(x, z) = q . doc_embedding(z)                   gradients reach the query encoder
    span scores over [CLS] x [SEP] title [SEP] body [SEP], for every block z
    loss = -log Σ_z p(z|x) Σ_{s matches an answer} p(s|z, x)

A prediction is the span with the highest ``p(z|x) p(s|z, x)``, cut from the block's original
text. The fixed indexes, and saving and loading a fine-tuned model, are in
:mod:`realm.retrieval.fixed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from realm.data.qa import BlockTexts, QABatch
from realm.data.store import BlockStore
from realm.losses import span_log_probs, span_marginal_loss
from realm.modeling.embed import special_ids
from realm.modeling.inputs import build_joined_inputs, build_query_inputs
from realm.modeling.span_reader import SpanReader, answer_span_mask
from realm.index.mips import SearchResult
from realm.modeling.retriever import Retriever


@dataclass
class OpenQAOutput:
    """What one forward returns (``loss`` only when answers are given).

    Attributes:
        block_ids: Blocks read, ``[B, k]``.
        retrieval_logits: ``f(x, z)`` of those blocks, ``[B, k]``.
        span_logits: ``[B, k, seq_len, max_span_tokens]``.
        span_mask: Valid spans, same shape.
        segment_ids: Title (1) / body (2) positions, ``[B, k, seq_len]``.
        body_start: Position of each block's first body word piece read, ``[B, k]``.
        title_start: Position of each block's first title word piece, ``[B, k]``.
        body_offset: Word piece of the body read first (a window's start; else 0), ``[B, k]``.
        answer_mask: Spans matching an answer, same shape as ``span_logits``.
        has_answer: Questions with an answer span among their blocks, ``[B]``.
        input_ids: The joined word pieces read, ``[B, k, seq_len]``.
    """

    block_ids: np.ndarray
    retrieval_logits: torch.Tensor
    span_logits: torch.Tensor
    span_mask: torch.Tensor
    segment_ids: torch.Tensor
    title_start: np.ndarray
    body_start: np.ndarray
    body_offset: Optional[np.ndarray] = None
    answer_mask: Optional[torch.Tensor] = None
    has_answer: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    input_ids: Optional[np.ndarray] = None


def retrieve_blocks(retriever: Optional[Retriever], index, questions: Sequence[str],
                    question_ids: Optional[Sequence[Sequence[int]]], k: int,
                    special: tuple[int, int, int], max_question_tokens: int) -> SearchResult:
    """The top ``k`` blocks of each question over a fixed index, for every Open-QA model.

    Args:
        retriever: The dense retriever whose document encoder built ``index``; None: ``index``
            is BM25 and searches the question texts.
        index: :class:`realm.retrieval.fixed.DenseIndex` (or its ``HybridIndex``, which
            also reads the question texts) or :class:`realm.retrieval.fixed.BM25Index`.
        questions: ``B`` question texts.
        question_ids: Their word pieces (no special tokens; dense only).
        k: Blocks per question.
        special: ``(cls_id, sep_id, pad_id)`` of the retriever's tokenizer.
        max_question_tokens: Word pieces of a question kept.

    Returns:
        Retrieval logits ``[B, k]`` (a tensor; with grad to the query encoder over a dense index,
        constants from BM25) and block ids ``[B, k]``.
    """
    if retriever is None:
        return index.search(list(questions), k)
    q_reps = query_reps(retriever, question_ids, special, max_question_tokens)
    return index.search(q_reps, k, questions=list(questions))


def query_reps(retriever: Retriever, question_ids: Sequence[Sequence[int]],
               special: tuple[int, int, int], max_question_tokens: int) -> torch.Tensor:
    """The query encoder's ``[B, dim]`` for questions' word pieces (no special tokens)."""
    device = next(retriever.parameters()).device
    cls_id, sep_id, pad_id = special
    q_in = build_query_inputs(list(question_ids), cls_id, sep_id, pad_id,
                              max_length=max_question_tokens + 2)
    return retriever.encode_queries(*(t.to(device) for t in q_in)).q_reps


def freeze_for_fixed_index(retriever: Retriever, train_query_encoder: bool,
                           train_doc_encoder: bool = False) -> None:
    """The index is fixed: the document encoder never trains (unless it is the query encoder
    too, or ``train_doc_encoder``: an index the refresher keeps fresh), and DDP must not wait
    for gradients it never gets; the query encoder trains only if ``train_query_encoder``."""
    if not retriever.share_weights and not train_doc_encoder:
        retriever.doc_encoder.requires_grad_(False)
    if not train_query_encoder:
        retriever.query_encoder.requires_grad_(False)


class OpenQAModel(nn.Module):
    """Retriever (query encoder; None for BM25) over a fixed index, and a span reader.

    Args:
        retriever: Dense retriever whose document encoder built ``index``; None with BM25.
        reader: The span reader.
        index: :class:`realm.retrieval.fixed.DenseIndex` or
            :class:`realm.retrieval.fixed.BM25Index` over ``store``.
        store: The knowledge corpus.
        tokenizer: The word-piece tokenizer of the corpus, retriever and reader.
        k: Blocks read per question.
        max_question_tokens, max_joined_tokens: Word pieces kept.
        regex: Answers are regular expressions.
        train_query_encoder: Let gradients reach the query encoder.
        normalization: ``shared`` (one span softmax over all blocks read, p(z|x) its prior) or
            ``block`` (REALM's p(z|x) p(s|z, x)); see :func:`realm.losses.span_log_probs`.
        retrieval_temperature: ``p(z|x) = softmax(f(x, z) / T)`` (BM25 scores differ by several
            points between neighbours, which makes p(z|x) one-hot at T = 1).
    """

    def __init__(self, retriever: Optional[Retriever], reader: SpanReader, index, store: BlockStore,
                 tokenizer, k: int = 5, max_question_tokens: int = 48,
                 max_joined_tokens: int = 320, regex: bool = False,
                 train_query_encoder: bool = True, normalization: str = "shared",
                 retrieval_temperature: float = 1.0):
        super().__init__()
        if normalization not in ("block", "shared"):
            raise ValueError(f"normalization must be 'block' or 'shared', got {normalization!r}")
        if retrieval_temperature <= 0:
            raise ValueError(f"retrieval_temperature must be > 0, got {retrieval_temperature}")
        self.retriever, self.reader = retriever, reader
        self.index, self.store, self.tokenizer = index, store, tokenizer
        self.texts = BlockTexts(store, tokenizer)
        self.k, self.regex = k, regex
        self.normalization, self.retrieval_temperature = normalization, retrieval_temperature
        self.max_question_tokens, self.max_joined_tokens = max_question_tokens, max_joined_tokens
        self.special = special_ids(tokenizer)
        if retriever is not None:
            freeze_for_fixed_index(retriever, train_query_encoder)

    @property
    def dense(self) -> bool:
        return self.retriever is not None

    def retrieve(self, batch: QABatch, k: int) -> SearchResult:
        """Top-``k`` blocks: retrieval logits ``[B, k]`` (a tensor; with grad to the query encoder
        over a dense index) and block ids ``[B, k]``."""
        return retrieve_blocks(self.retriever, self.index, batch.questions, batch.question_ids,
                               k, self.special, self.max_question_tokens)

    def forward(self, batch: QABatch, ids: Optional[np.ndarray] = None,
                logits: Optional[torch.Tensor] = None, with_loss: bool = True,
                windows: Optional[np.ndarray] = None) -> OpenQAOutput:
        """Retrieve (unless ``ids``/``logits`` are given), read, and with answers the loss.

        ``windows`` ``[B, k, 2]``: read only body word pieces ``start .. start + length`` of
        each block (the positive-block warm-up reads windows around the answer).
        """
        device = next(self.reader.parameters()).device
        if ids is None:
            logits, ids = self.retrieve(batch, self.k)
        n, k = ids.shape
        cls_id, sep_id, pad_id = self.special
        titles = [[self.store.title_ids(int(b)) for b in row] for row in ids]
        bodies = [[self.store.body_ids(int(b)) for b in row] for row in ids]
        offset = np.zeros((n, k), np.int64)
        if windows is not None:
            offset = windows[..., 0].astype(np.int64)
            bodies = [[body[s: s + w] for body, (s, w) in zip(row, win)]
                      for row, win in zip(bodies, windows)]
        joined = build_joined_inputs(batch.question_ids, titles, bodies, cls_id, sep_id, pad_id,
                                     max_length=self.max_joined_tokens, append_null=False)
        out = self.reader(joined.input_ids.to(device), joined.attention_mask.to(device),
                          joined.token_type_ids.to(device), joined.segment_ids.to(device))
        seq_len, width = out.span_logits.shape[1:]
        segments = joined.segment_ids  # [B * k, L]
        q_len = np.array([len(q) for q in batch.question_ids])  # [B]
        title_start = np.repeat(q_len + 2, k).reshape(n, k)  # after [CLS] x [SEP]
        title_len = (segments == 1).sum(dim=1).numpy().reshape(n, k)  # [B, k]
        body_start = title_start + title_len + 1  # after title [SEP]
        result = OpenQAOutput(
            block_ids=ids, retrieval_logits=logits.to(device),
            span_logits=out.span_logits.view(n, k, seq_len, width),
            span_mask=out.span_mask.view(n, k, seq_len, width),
            segment_ids=segments.view(n, k, seq_len), title_start=title_start,
            body_start=body_start, body_offset=offset,
            input_ids=joined.input_ids.numpy().reshape(n, k, seq_len))
        if with_loss:
            answer = self._answer_mask(batch, result, joined.input_ids.numpy())
            result.answer_mask = torch.from_numpy(answer).to(device)
            flat = (n, k, seq_len * width)
            result.loss, result.has_answer = span_marginal_loss(
                self.prior_logits(result), result.span_logits.reshape(flat),
                result.span_mask.reshape(flat), result.answer_mask.reshape(flat),
                self.normalization)
        return result

    def prior_logits(self, out: OpenQAOutput) -> torch.Tensor:
        """``f(x, z) / T``: the logits of ``p(z|x)``, ``[B, k]``."""
        return out.retrieval_logits.float() / self.retrieval_temperature

    def _answer_mask(self, batch: QABatch, out: OpenQAOutput, input_ids: np.ndarray) -> np.ndarray:
        """Spans matching an answer, ``[B, k, seq_len, width]`` (word pieces, or regex on text)."""
        n, k, seq_len, width = out.span_mask.shape
        valid = out.span_mask.cpu().numpy()
        mask = np.zeros_like(valid)
        segments = out.segment_ids.numpy()
        for i in range(n):
            for j in range(k):
                if not self.regex:
                    mask[i, j] = answer_span_mask(input_ids[i * k + j], valid[i, j],
                                                  batch.answer_ids[i])
                    continue
                block = int(out.block_ids[i, j])
                for segment, start, first in ((1, out.title_start[i, j], 0),
                                              (2, out.body_start[i, j], out.body_offset[i, j])):
                    n_tok = int((segments[i, j] == segment).sum())
                    for s, w in self.texts.regex_spans(block, segment, n_tok, batch.answers[i],
                                                       width, int(first)):
                        mask[i, j, start + s, w] = True
                mask[i, j] &= valid[i, j]
        return mask

    # -- prediction -----------------------------------------------------------------------

    def best_spans(self, out: OpenQAOutput) -> list[dict[str, Any]]:
        """The answer of each question: the span of highest ``p(z, s|x)`` over all blocks
        (``prediction``, ``block``, ``score``), and where it lies in that block: ``field``
        (``title`` or ``text``) and ``chars``, its ``[first, last)`` character range there."""
        n, k, seq_len, width = out.span_logits.shape
        valid = out.span_mask.reshape(n, k, -1)
        joint = span_log_probs(self.prior_logits(out), out.span_logits.reshape(n, k, -1), valid,
                               self.normalization)  # [B, k, L * W]
        joint = joint.masked_fill(~valid, -float("inf")).reshape(n, -1)
        best = joint.argmax(dim=-1).cpu().numpy()  # [B]
        preds = []
        for i, flat_index in enumerate(best):
            j, pos = divmod(int(flat_index), seq_len * width)
            start, w = divmod(pos, width)
            block = int(out.block_ids[i, j])
            segment = int(out.segment_ids[i, j, start])
            offset = (out.title_start[i, j] if segment == 1
                      else out.body_start[i, j] - out.body_offset[i, j])
            first, last = self.texts.span_chars(block, segment, start - offset,
                                                start - offset + w)
            text = (self.store.title(block) if segment == 1 else self.store.text(block))
            preds.append({"prediction": text[first:last], "block": block,
                          "score": float(joint[i, flat_index].detach()),
                          "field": "title" if segment == 1 else "text", "chars": (first, last)})
        return preds

    def answer_posteriors(self, out: OpenQAOutput, predictions: Sequence[dict[str, Any]]
                          ) -> torch.Tensor:
        """``p(z|x, y)`` ``[B, k]`` of each question's predicted answer y (:meth:`best_spans`):
        each block's share of ``p(z, s|x)`` summed over its spans whose word pieces are y's (the
        block of the best span alone where y's word pieces are found nowhere)."""
        n, k, seq_len, width = out.span_logits.shape
        valid = out.span_mask.reshape(n, k, seq_len, width)
        joint = span_log_probs(self.prior_logits(out), out.span_logits.reshape(n, k, -1),
                               valid.reshape(n, k, -1), self.normalization).detach().cpu()
        valid = valid.cpu().numpy()
        posteriors = torch.zeros(n, k)
        for i, pred in enumerate(predictions):
            ids = np.asarray(self.tokenizer(pred["prediction"], add_special_tokens=False)[
                "input_ids"], np.int64)
            match = torch.from_numpy(np.stack([
                answer_span_mask(out.input_ids[i, j], valid[i, j], [ids]) for j in range(k)
            ]).reshape(k, -1))  # [k, L * W]
            if not bool(match.any()):
                posteriors[i, list(out.block_ids[i]).index(pred["block"])] = 1.0
                continue
            mass = torch.logsumexp(joint[i].masked_fill(~match, -float("inf")), dim=-1)  # [k]
            posteriors[i] = torch.softmax(mass, dim=-1)
        return posteriors
