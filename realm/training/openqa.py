"""Open-QA fine-tuning and evaluation (REALM, Guu et al. 2020, section 3.4).

The document index is built once from the (pretrained) document encoder and stays fixed; the
query encoder and the reader train. Per question x::

    q = Embed_input(x)                               (dense; BM25 has no parameters)
    top-k = MIPS(q.detach(), fixed index)            k = 5 in REALM
    f(x, z) = q . doc_embedding(z)                   gradients reach the query encoder
    span scores over [CLS] x [SEP] title [SEP] body [SEP], for every block z
    loss = -log Σ_z p(z|x) Σ_{s matches an answer} p(s|z, x)

A prediction is the span with the highest ``p(z|x) p(s|z, x)``, cut from the block's original
text. A fine-tuned model is a directory ``model/`` (manifest, retriever, reader and the fixed
document embeddings) that ``launch/evaluate.py openqa --model`` reads.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from realm.data.qa import QAExample
from realm.data.store import BlockStore
from realm.evaluation.answers import compile_answer_pattern, exact_match, f1_score, has_answer
from realm.evaluation.retrieval import recall_at_k
from realm.losses import span_log_probs, span_marginal_loss
from realm.modeling.ka_encoder import build_joined_inputs
from realm.modeling.modes import eval_mode
from realm.modeling.reader import MANIFEST_KIND as READER_KIND
from realm.modeling.reader import SpanReader, answer_span_mask, occurrences
from realm.modeling.retriever import (Retriever, _atomic_directory, _write_manifest,
                                      build_query_inputs, read_manifest)

logger = logging.getLogger(__name__)

MANIFEST_KIND = "openqa_model"
FORMAT_VERSION = 1
EMBEDDINGS_FILE = "doc_embeddings.npy"


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
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
        text, offsets = self._segment(block, segment)
        if end >= len(offsets):  # the tokenizer disagrees with the stored ids: best effort
            end = len(offsets) - 1
        return text[offsets[start, 0]: offsets[end, 1]]

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


# ---------------------------------------------------------------------------------------------
# Retrieval over a fixed index


class DenseIndex:
    """Exact inner-product search over fixed document embeddings ``[n_blocks, dim]``."""

    def __init__(self, embeddings: np.ndarray):
        from realm.index.mips import build_index

        self.embeddings = torch.from_numpy(np.ascontiguousarray(embeddings, np.float32))
        self.index = build_index(self.embeddings.numpy())

    def search(self, q_reps: torch.Tensor, k: int) -> tuple[np.ndarray, torch.Tensor]:
        """Top-``k`` block ids ``[B, k]`` and their scores ``q . e`` ``[B, k]`` (with grad)."""
        from realm.index.mips import search

        ids = search(self.index, q_reps.detach().float().cpu().numpy(), k)[1]  # [B, k]
        docs = self.embeddings[torch.from_numpy(ids)].to(q_reps.device)  # [B, k, dim]
        return ids, torch.einsum("bd,bkd->bk", q_reps.float(), docs)  # [B, k]


class BM25Index:
    """BM25 (bm25s) over ``title + text`` of every block; scores are constants."""

    def __init__(self, store: BlockStore):
        from realm.evaluation.run import BM25Searcher

        self.bm25 = BM25Searcher(store).bm25

    def search_texts(self, questions: Sequence[str], k: int) -> tuple[np.ndarray, torch.Tensor]:
        scores, ids = self.bm25.search(list(questions), k)  # [B, k] each
        return ids, torch.from_numpy(np.ascontiguousarray(scores, np.float32))


def document_embeddings(retriever: Retriever, store: BlockStore, max_block_tokens: int,
                        cache: Optional[str] = None, progress: bool = True,
                        precision: str = "auto") -> np.ndarray:
    """The fixed index's embeddings: every block through the document encoder (cached)."""
    from realm.index.embed import embed_blocks, special_ids
    from realm.training.core import autocast_dtype

    if cache and os.path.isfile(cache):
        emb = np.load(cache)
        if emb.shape == (len(store), retriever.dim):
            logger.info("document embeddings from %s", cache)
            return emb
    device = next(retriever.parameters()).device
    bf16 = autocast_dtype(precision, device) == "bf16"
    emb, stats = embed_blocks(retriever, store, special_ids(retriever.tokenizer),
                              max_block_tokens=max_block_tokens, progress=progress, bf16=bf16)
    logger.info("embedded %d blocks for the fixed index in %.1f s (%.0f blocks/s)", len(store),
                stats["seconds"], stats["blocks_per_s"])
    if cache:
        os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
        tmp = f"{cache}.tmp-{os.getpid()}.npy"
        np.save(tmp, emb)
        os.replace(tmp, cache)
    return emb


# ---------------------------------------------------------------------------------------------
# The model


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


class OpenQAModel(nn.Module):
    """Retriever (query encoder; None for BM25) over a fixed index, and a span reader.

    Args:
        retriever: Dense retriever whose document encoder built ``index``; None with BM25.
        reader: The span reader.
        index: :class:`DenseIndex` or :class:`BM25Index` over ``store``.
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
        from realm.index.embed import special_ids

        self.special = special_ids(tokenizer)
        if retriever is not None:
            # the index is fixed: the document encoder never trains (unless it is the query
            # encoder too), and DDP must not wait for gradients it never gets
            if not retriever.share_weights:
                retriever.doc_encoder.requires_grad_(False)
            if not train_query_encoder:
                retriever.query_encoder.requires_grad_(False)

    @property
    def dense(self) -> bool:
        return self.retriever is not None

    def retrieve(self, batch: QABatch, k: int) -> tuple[np.ndarray, torch.Tensor]:
        """Top-``k`` blocks ``[B, k]`` and their retrieval logits ``[B, k]``."""
        if not self.dense:
            return self.index.search_texts(batch.questions, k)
        device = next(self.retriever.parameters()).device
        cls_id, sep_id, pad_id = self.special
        q_in = build_query_inputs(batch.question_ids, cls_id, sep_id, pad_id,
                                  max_length=self.max_question_tokens + 2)
        q_reps = self.retriever.encode_queries(*(t.to(device) for t in q_in)).q_reps  # [B, dim]
        return self.index.search(q_reps, k)

    def forward(self, batch: QABatch, ids: Optional[np.ndarray] = None,
                logits: Optional[torch.Tensor] = None, with_loss: bool = True,
                windows: Optional[np.ndarray] = None) -> OpenQAOutput:
        """Retrieve (unless ``ids``/``logits`` are given), read, and with answers the loss.

        ``windows`` ``[B, k, 2]``: read only body word pieces ``start .. start + length`` of
        each block (the positive-block warm-up reads windows around the answer).
        """
        device = next(self.reader.parameters()).device
        if ids is None:
            ids, logits = self.retrieve(batch, self.k)
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
            body_start=body_start, body_offset=offset)
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
        """The answer of each question: the span of highest ``p(z, s|x)`` over all blocks."""
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
            text = self.texts.span_text(block, segment, start - offset, start - offset + w)
            preds.append({"prediction": text, "block": block,
                          "score": float(joint[i, flat_index].detach())})
        return preds


# ---------------------------------------------------------------------------------------------
# Positive blocks: the reader's warm-up (DPR's reader training)


@dataclass
class Positives:
    """For each training question: the best-ranked retrieved block holding an answer, where in
    its body the answer starts, and retrieved blocks without one (DPR's reader training data).

    Attributes:
        positive: Block id, ``-1`` where none of the searched blocks holds an answer, ``[N]``.
        answer_start: First body word piece of the answer in the positive block, ``-1`` where
            it is only in the title or answers are patterns, ``[N]``.
        answer_length: Its word pieces, ``[N]``.
        negatives: Top-ranked blocks without an answer, ``-1`` where too few, ``[N, n]``.
    """

    positive: np.ndarray
    answer_start: np.ndarray
    answer_length: np.ndarray
    negatives: np.ndarray

    def subset(self, keep: np.ndarray) -> "Positives":
        return Positives(self.positive[keep], self.answer_start[keep], self.answer_length[keep],
                         self.negatives[keep])


def _find_answer(ids: np.ndarray, answers: Sequence[np.ndarray]) -> tuple[int, int]:
    """``(start, length)`` of the earliest answer in ``ids``, ``(-1, 0)`` if none."""
    best = (-1, 0)
    for answer in answers:
        hits = occurrences(ids, answer)
        if len(hits) and (best[0] < 0 or hits[0] < best[0]):
            best = (int(hits[0]), len(answer))
    return best


@torch.no_grad()
def find_positives(model: OpenQAModel, dataset: QADataset, search_k: int = 20,
                   negatives: int = 1, batch_size: int = 64, progress: bool = True) -> Positives:
    """Search the top ``search_k`` blocks of every question with the model's retriever and pick
    the first that holds an answer (word pieces, or the pattern in its text) as the positive and
    the first ``negatives`` that do not as its negatives."""
    n = len(dataset)
    out = Positives(np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.zeros(n, np.int64),
                    np.full((n, negatives), -1, np.int64))
    bar = tqdm(total=n, desc="positive blocks", unit="q", disable=not progress, mininterval=1.0)
    with eval_mode(model):  # the query encoder's dropout off, as in evaluation
        for lo in range(0, n, batch_size):
            batch = collate_qa([dataset[i] for i in range(lo, min(lo + batch_size, n))])
            ids, _ = model.retrieve(batch, min(search_k, len(model.store)))
            for i, row in enumerate(ids):
                q, found_negatives = lo + i, []
                for block in (int(b) for b in row):
                    if model.regex:
                        hit = has_answer(f"{model.store.title(block)} {model.store.text(block)}",
                                         batch.answers[i], regex=True)
                        start, length = -1, 0
                    else:  # an answer longer than the reader's longest span cannot be learned
                        answers = [a for a in batch.answer_ids[i]
                                   if len(a) <= model.reader.max_span_tokens]
                        start, length = _find_answer(model.store.body_ids(block), answers)
                        hit = (start >= 0
                               or _find_answer(model.store.title_ids(block), answers)[0] >= 0)
                    if hit and out.positive[q] < 0:
                        out.positive[q], out.answer_start[q] = block, start
                        out.answer_length[q] = length
                    elif not hit and len(found_negatives) < negatives:
                        found_negatives.append(block)
                out.negatives[q, : len(found_negatives)] = found_negatives
            bar.update(len(ids))
    bar.close()
    return out


def positive_windows(positives: Positives, indices: Sequence[int], store: BlockStore,
                     window: Optional[int], rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Blocks ``[B, 1 + n]`` (the positive first; a missing negative becomes a random block)
    and body windows ``[B, 1 + n, 2]`` of at most ``window`` word pieces (None: whole bodies);
    the positive's window holds its answer at a random place."""
    idx = np.asarray(indices)
    blocks = np.concatenate([positives.positive[idx, None], positives.negatives[idx]], axis=1)
    missing = blocks < 0
    blocks[missing] = rng.integers(0, len(store), int(missing.sum()))
    windows = np.zeros(blocks.shape + (2,), np.int64)
    for i, q in enumerate(idx):
        for j, block in enumerate(blocks[i]):
            size = len(store.body_ids(int(block)))
            if window is None or size <= window:
                windows[i, j] = (0, size)
                continue
            lo, hi = 0, size - window  # window starts that stay inside the body
            start, length = positives.answer_start[q], positives.answer_length[q]
            if j == 0 and start >= 0:  # keep the answer inside
                lo, hi = max(0, start + length - window), min(start, hi)
            windows[i, j] = (rng.integers(lo, max(lo, hi) + 1), window)
    return blocks, windows


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_openqa(model: OpenQAModel, examples: Sequence[QAExample], recall_ks: Sequence[int],
                    batch_size: int = 16, bf16: bool = False,
                    progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """EM, F1 and answer recall@k of the retrieval, with one prediction record per question.

    The reader reads the top ``model.k`` blocks; recall is measured on the top ``max(recall_ks)``.
    """
    t0 = time.perf_counter()
    with eval_mode(model):
        dataset = QADataset(examples, model.tokenizer, model.max_question_tokens, model.regex)
        k_read = model.k
        k_max = min(max(max(recall_ks), k_read), len(model.store))
        device = next(model.reader.parameters()).device
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
                    else torch.autocast(device.type, enabled=False))
        records, hits = [], []
        bar = tqdm(total=len(dataset), desc="evaluate", unit="q", disable=not progress,
                   mininterval=1.0)
        for lo in range(0, len(dataset), batch_size):
            batch = collate_qa([dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))])
            with autocast:
                ids, logits = model.retrieve(batch, k_max)
                out = model(batch, ids[:, :k_read], logits[:, :k_read], with_loss=False)
            for i, pred in enumerate(model.best_spans(out)):
                ex = examples[lo + i]
                texts = [model.store.text(int(b)) for b in ids[i]]
                hits.append([has_answer(t, ex.answers, regex=model.regex) for t in texts])
                records.append({
                    "question": ex.question, "prediction": pred["prediction"], "gold": ex.answers,
                    "exact_match": exact_match(pred["prediction"], ex.answers, regex=model.regex),
                    "f1": 0.0 if model.regex else f1_score(pred["prediction"], ex.answers),
                    "retrieved": [{"title": model.store.title(int(b)), "block": int(b),
                                   "score": round(float(s), 4)}
                                  for b, s in zip(ids[i][:k_read], logits[i][:k_read].tolist())],
                    "answer_block": model.store.title(pred["block"]),
                })
            bar.update(len(batch.questions))
        bar.close()
    seconds = time.perf_counter() - t0
    ks = sorted({k for k in list(recall_ks) + [k_read] if k <= k_max})
    report: dict[str, Any] = {
        "exact_match": round(float(np.mean([r["exact_match"] for r in records])), 4),
        "f1": None if model.regex else round(float(np.mean([r["f1"] for r in records])), 4),
    }
    report.update({f"answer_recall@{k}": round(v, 4)
                   for k, v in recall_at_k(np.array(hits, dtype=bool), ks).items()})
    report.update({"questions": len(records), "k": k_read, "seconds": round(seconds, 2),
                   "questions_per_s": round(len(records) / max(seconds, 1e-9), 2)})
    return report, records


def write_predictions(records: Sequence[dict[str, Any]], path: str) -> None:
    """Predictions as jsonl, written to a temporary name and renamed (complete or absent)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Saving and loading a fine-tuned model


def save_openqa_model(model: OpenQAModel, directory: str, settings: dict[str, Any],
                      metadata: Optional[dict[str, Any]] = None) -> Path:
    """``directory``: manifest, ``retriever/`` and document embeddings (dense), ``reader/``."""
    with _atomic_directory(Path(directory), overwrite=True) as tmp:
        model.reader.save_pretrained(tmp / "reader")
        if model.reader.tokenizer is not None:  # AutoTokenizer.from_pretrained(directory)
            model.reader.tokenizer.save_pretrained(str(tmp))
        if model.dense:
            model.retriever.save_pretrained(tmp / "retriever")
            np.save(tmp / EMBEDDINGS_FILE, model.index.embeddings.numpy())
        fields = {"retrieval": "dense" if model.dense else "bm25",
                  "corpus": {"path": str(model.store.path),
                             "fingerprint": model.store.fingerprint},
                  **settings}
        _write_manifest(tmp, MANIFEST_KIND, FORMAT_VERSION, fields, metadata)
    logger.info("saved the Open-QA model to %s", directory)
    return Path(directory)


def load_openqa_model(directory: str, store: BlockStore, max_block_tokens: int = 288,
                      progress: bool = True, precision: str = "auto") -> OpenQAModel:
    """A model saved by :func:`save_openqa_model`, over ``store``.

    The saved document embeddings are used when ``store`` is the corpus they were made from;
    any other corpus is embedded with the saved document encoder.
    """
    from realm.training.ict import check_tokenizer

    manifest = read_manifest(directory, kind=MANIFEST_KIND)
    reader = SpanReader.from_pretrained(os.path.join(directory, "reader"))
    retriever = None
    if manifest["retrieval"] == "dense":
        retriever = Retriever.from_pretrained(os.path.join(directory, "retriever"))
        check_tokenizer(retriever.tokenizer, store)
        if manifest["corpus"]["fingerprint"] == store.fingerprint:
            index = DenseIndex(np.load(os.path.join(directory, EMBEDDINGS_FILE)))
        else:
            logger.info("%s is not the corpus the model was fine-tuned on: embedding it",
                        store.path)
            index = DenseIndex(document_embeddings(retriever, store, max_block_tokens,
                                                   progress=progress, precision=precision))
    else:
        index = BM25Index(store)
    check_tokenizer(reader.tokenizer, store)
    return OpenQAModel(retriever, reader, index, store, reader.tokenizer, k=manifest["k"],
                       max_question_tokens=manifest["max_question_tokens"],
                       max_joined_tokens=manifest["max_joined_tokens"],
                       regex=manifest.get("regex", False),
                       # models saved before these existed were trained and read this way
                       normalization=manifest.get("normalization", "block"),
                       retrieval_temperature=manifest.get("retrieval_temperature", 1.0))


# ---------------------------------------------------------------------------------------------
# The training task and the stage


class OpenQATask:
    """The training core's task: span-marginal loss on training questions, EM on dev ones.

    For the first ``positive_steps`` steps each question is read beside its positive block
    (a window of ``window`` body word pieces around the answer) and its negatives, with a
    uniform p(z|x), as DPR's reader trains; then over the top k retrieved blocks.
    """

    def __init__(self, dataset: QADataset, dev: Sequence[QAExample], unwrap, recall_ks,
                 batch_size: int, bf16: bool, positives: Optional[Positives] = None,
                 positive_steps: int = 0, window: Optional[int] = None, seed: int = 0):
        self.dataset, self.dev, self.unwrap = dataset, list(dev), unwrap
        self.recall_ks, self.batch_size, self.bf16 = recall_ks, batch_size, bf16
        if positive_steps and positives is None:
            raise ValueError("positive_steps > 0 needs the positive blocks")
        self.positives, self.positive_steps, self.window = positives, positive_steps, window
        self.seed, self.step = seed, 0

    def before_step(self, step: int) -> None:  # a hook of the training core
        self.step = step

    def train_dataset(self) -> QADataset:
        return self.dataset

    def collate(self, items) -> QABatch:
        return collate_qa(items)

    def loss(self, model: nn.Module, batch: QABatch) -> tuple[torch.Tensor, dict[str, float]]:
        warm_up = self.step < self.positive_steps
        if warm_up:
            # the same blocks and windows whenever this step is replayed (resume)
            rng = np.random.default_rng([self.seed, self.step, batch.indices[0]])
            ids, windows = positive_windows(self.positives, batch.indices,
                                            self.unwrap(model).store, self.window, rng)
            out = model(batch, ids, torch.zeros(ids.shape), windows=windows)
        else:
            out = model(batch)
        with torch.no_grad():
            p_z = torch.softmax(self.unwrap(model).prior_logits(out), dim=-1)  # [B, k]
            block_has = out.answer_mask.flatten(2).any(dim=-1).float()  # [B, k]
            metrics = {"answerable": float(out.has_answer.float().mean()),
                       "p_answer_blocks": float((p_z * block_has).sum(-1).mean()),
                       "positive_warm_up": float(warm_up)}
        return out.loss, metrics

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.dev:
            return {}
        report, _ = evaluate_openqa(self.unwrap(model), self.dev, self.recall_ks,
                                    self.batch_size, self.bf16, progress=False)
        return {k: v for k, v in report.items() if isinstance(v, float)}


def span_reader_dir(path: str) -> Optional[str]:
    """The fine-tuned span reader that ``path`` names, if any: a reader directory, an Open-QA
    model directory (its ``reader/``) or an Open-QA run directory (its ``model/reader/``)."""
    for candidate in (path, os.path.join(path, "reader"), os.path.join(path, "model", "reader")):
        manifest = os.path.join(candidate, "manifest.json")
        if os.path.isfile(manifest):
            with open(manifest, encoding="utf-8") as f:
                if json.load(f).get("kind") == READER_KIND:
                    return candidate
    return None


def prepare_qa_stage(config, section, name: str, progress: bool = True):
    """What a stage that trains on questions starts from: the corpus (``section.corpus``, or the
    ``data`` section's built into ``pretrain.cache_dir``), the training and dev questions, and
    the accelerator (seeded). A section with ``triplets`` may have no ``train_qa``.

    Returns:
        ``(corpus_dir, store, train_qa, dev_qa, accelerator, precision)``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from realm.data.qa import read_qa
    from realm.prepare import prepare_corpus
    from realm.training.core import training_precision

    if not section.train_qa and not getattr(section, "triplets", None):
        raise ValueError(f"{name}.train_qa: no training questions given")
    corpus_dir = section.corpus or prepare_corpus(config, progress)
    store = BlockStore(corpus_dir)
    train_qa = read_qa(section.train_qa, regex=section.regex) if section.train_qa else []
    dev_qa = read_qa(section.dev_qa, regex=section.regex) if section.dev_qa else []
    t = config.train
    use_cpu = not torch.cuda.is_available()
    precision = training_precision(t.precision, torch.device("cpu" if use_cpu else "cuda"))
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision or "no",
                              gradient_accumulation_steps=t.grad_accum)
    set_seed(config.seed)
    return corpus_dir, store, train_qa, dev_qa, accelerator, precision


def run_finetune(config, progress: bool = True) -> dict[str, Any]:
    """Open-QA fine-tuning with the shared core, then the dev evaluation; returns the summary."""
    from realm.config import save_config
    from realm.fsutil import sha256_file
    from realm.hub import run_part
    from realm.tracking import Tracker
    from realm.training.core import TrainSettings, train
    from realm.training.ict import (_shutdown, check_tokenizer, load_retriever,
                                   parameters_sha256)
    from realm.prepare import (_digest, prepare_dpr_retriever, prepare_qa_reader,
                               truncated_encoder)

    t0 = time.time()
    o, t = config.openqa, config.train
    corpus_dir, store, train_qa, dev_qa, accelerator, precision = prepare_qa_stage(
        config, o, "openqa", progress)

    trained = prepare_qa_reader(config) or span_reader_dir(o.reader)
    if trained:  # a fine-tuned reader, span scorer and all
        reader = SpanReader.from_pretrained(trained)
        if (reader.scorer_kind, reader.max_span_tokens) != (o.span_scorer, o.max_span_tokens):
            raise ValueError(
                f"openqa.reader: {trained} reads with span_scorer={reader.scorer_kind}, "
                f"max_span_tokens={reader.max_span_tokens}; this config asks for "
                f"{o.span_scorer}, {o.max_span_tokens}")
    else:
        reader_source = o.reader
        if not os.path.isdir(o.reader) or os.path.isfile(os.path.join(o.reader, "config.json")):
            # a checkpoint (not a saved encoder or a run directory): maybe cut to its first layers
            reader_source = truncated_encoder(o.reader, o.reader_layers, config.pretrain.cache_dir)
        reader = SpanReader.from_checkpoint(reader_source, o.max_span_tokens, o.span_hidden,
                                            scorer=o.span_scorer, seed=config.seed)
    check_tokenizer(reader.tokenizer, store)
    retriever, retriever_dir = None, None
    if o.retriever == "bm25":
        index = BM25Index(store)
    else:
        r = config.retriever
        retriever_dir = (prepare_dpr_retriever(config, corpus_dir) if o.retriever == "dpr"
                         else run_part(o.retriever, "retriever"))
        manifest = os.path.join(retriever_dir, "manifest.json")
        if os.path.isfile(manifest):
            retriever, source = Retriever.from_pretrained(retriever_dir), sha256_file(manifest)
        else:  # a transformers checkpoint: zero-shot, as the `retriever` section builds it
            if os.path.isdir(retriever_dir) and not os.path.isfile(
                    os.path.join(retriever_dir, "config.json")):
                raise ValueError(f"openqa.retriever: {o.retriever} is neither a retriever "
                                 f"directory, a run directory with a retriever/, nor a "
                                 f"transformers checkpoint (no manifest.json, no config.json)")
            retriever = load_retriever(retriever_dir, r.dim, r.pooling, r.encoder_layers,
                                       config.pretrain.cache_dir)
            # the projection is new (seeded), so the index is keyed on its values too: another
            # seed's cached index would not match this query encoder
            source, retriever_dir = ["zero-shot", o.retriever, r.dim, r.pooling,
                                     r.encoder_layers,
                                     parameters_sha256(retriever.doc_encoder.projection)], None
        check_tokenizer(retriever.tokenizer, store)
        key = _digest([source, store.fingerprint, r.max_block_tokens, config.refresh.precision])
        cache = os.path.join(config.pretrain.cache_dir, f"openqa-index-{key}.npy")
        if accelerator.is_main_process:
            document_embeddings(retriever, store, r.max_block_tokens, cache, progress,
                                config.refresh.precision)
        accelerator.wait_for_everyone()
        index = DenseIndex(document_embeddings(retriever, store, r.max_block_tokens, cache,
                                               progress, config.refresh.precision))
    model = OpenQAModel(retriever, reader, index, store, reader.tokenizer, k=o.k,
                        max_question_tokens=o.max_question_tokens,
                        max_joined_tokens=o.max_joined_tokens, regex=o.regex,
                        train_query_encoder=o.train_query_encoder,
                        normalization=o.normalization,
                        retrieval_temperature=o.retrieval_temperature)
    dataset = QADataset(train_qa, reader.tokenizer, o.max_question_tokens, o.regex)
    # DPR's reader data: each question's best-ranked block with an answer and blocks without;
    # a question with no answer in its top blocks teaches nothing and is left out
    positives = find_positives(model, dataset, max(o.positive_search, o.k), o.positive_negatives,
                               progress=progress and accelerator.is_main_process)
    keep = np.flatnonzero(positives.positive >= 0)
    logger.info("%d of %d training questions have an answer in their top %d blocks; the "
                "others are left out", len(keep), len(dataset), max(o.positive_search, o.k))
    if not len(keep):
        raise ValueError(f"openqa.train_qa: no training question of {o.train_qa} has an answer "
                         f"in its top {max(o.positive_search, o.k)} blocks")
    dataset = QADataset([train_qa[i] for i in keep], reader.tokenizer, o.max_question_tokens,
                        o.regex)
    dev_during = dev_qa[: o.eval_limit] if o.eval_limit else dev_qa
    task = OpenQATask(dataset, dev_during, accelerator.unwrap_model, o.recall_ks,
                      o.eval_batch_size, precision == "bf16", positives.subset(keep),
                      min(o.positive_steps, t.steps), o.positive_window, config.seed)
    if accelerator.is_main_process:
        save_config(config, t.run_dir)
    tracker = Tracker.from_config(config, enabled=accelerator.is_main_process)
    settings = TrainSettings.from_config(config, progress)
    report: dict[str, Any] = {}
    world_size = accelerator.num_processes
    try:
        result = train(model, task, settings, accelerator, tracker, hooks=[task],
                       config_dict=config.to_dict())
        unwrapped = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            save_openqa_model(unwrapped, os.path.join(t.run_dir, "model"), {
                "k": o.k, "max_question_tokens": o.max_question_tokens,
                "max_joined_tokens": o.max_joined_tokens, "regex": o.regex,
                "normalization": o.normalization,
                "retrieval_temperature": o.retrieval_temperature,
                "retriever_source": o.retriever, "reader_source": trained or o.reader,
            }, metadata={"stage": "finetune_openqa", "steps": result["steps"]})
            if dev_qa:
                report, records = evaluate_openqa(unwrapped, dev_qa, o.recall_ks,
                                                  o.eval_batch_size, precision == "bf16",
                                                  progress)
                write_predictions(records, os.path.join(t.run_dir, "predictions-dev.jsonl"))
                tracker.log({f"final/{k}": v for k, v in report.items()
                             if isinstance(v, (int, float))}, step=result["steps"])
                tracker.log_table(  # a look at the answers in wandb
                    "dev_predictions", ["question", "prediction", "gold", "exact_match",
                                        "answer_block", "retrieved"],
                    [[r["question"], r["prediction"], " | ".join(r["gold"]), r["exact_match"],
                      r["answer_block"], " | ".join(f"{b['title']} ({b['score']})"
                                                    for b in r["retrieved"])]
                     for r in records[:50]], step=result["steps"])
        accelerator.wait_for_everyone()
    finally:
        tracker.close()
        del model, task
        _shutdown(accelerator)
    return {
        "stage": "finetune_openqa", "run_dir": t.run_dir, "retriever": o.retriever,
        "retriever_dir": retriever_dir,
        "reader": trained or o.reader, "steps": result["steps"],
        "final_loss": round(result["final_loss"], 5) if np.isfinite(result["final_loss"]) else None,
        "train_questions": len(train_qa), "train_questions_with_positive": int(len(keep)),
        "positive_steps": min(o.positive_steps, t.steps), "examples_per_s": result["examples_per_s"],
        "precision": precision or "fp32", "world_size": world_size,
        "dev": report, "model": os.path.join(t.run_dir, "model"),
        "seconds": round(time.time() - t0, 1),
    }


def main(argv=None, default_config: Optional[str] = None) -> int:
    """``launch/finetune_openqa.py`` and the reader's warm start; see :data:`realm.cli.STAGES`."""
    from realm.cli import stage_main

    return stage_main("finetune_openqa", argv, default_config)


if __name__ == "__main__":  # the reader's warm start (realm.prepare.prepare_qa_reader)
    raise SystemExit(main())
