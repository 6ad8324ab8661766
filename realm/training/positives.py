"""Positive blocks: the Open-QA reader's warm-up (DPR's reader training, Karpukhin et al. 2020).

For each training question the best-ranked retrieved block holding an answer (the positive) and
retrieved blocks without one (negatives); early fine-tuning steps read each question beside them,
through body windows that keep the answer inside (:func:`positive_windows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from realm.data.qa import QADataset, collate_qa
from realm.data.store import BlockStore
from realm.metrics import has_answer
from realm.modeling.modes import eval_mode
from realm.modeling.openqa import OpenQAModel
from realm.modeling.span_reader import occurrences


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
            ids = model.retrieve(batch, min(search_k, len(model.store))).block_ids
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


@torch.no_grad()
def generative_positives(model, examples: Sequence, search_k: int = 20, batch_size: int = 64,
                         progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The RAG generator's warm-up blocks: for each training question the best-ranked of its
    top ``search_k`` blocks whose title or text holds an answer, or its top block where none
    does (read as the marginal stage reads it).

    Args:
        model: A :class:`realm.modeling.rag.GenerativeOpenQAModel` with retrieval.
        examples: The training :class:`realm.data.qa.QAExample` s.

    Returns:
        ``(blocks [N], found [N] bool)``: the block each question reads, and whether it holds
        an answer.
    """
    n = len(examples)
    blocks, found = np.full(n, -1, np.int64), np.zeros(n, bool)
    bar = tqdm(total=n, desc="positive blocks", unit="q", disable=not progress, mininterval=1.0)
    with eval_mode(model):  # the query encoder's dropout off, as in evaluation
        for lo in range(0, n, batch_size):
            batch = examples[lo: lo + batch_size]
            ids = model.retrieve([ex.question for ex in batch], search_k).block_ids
            hits = model.block_has_answer(ids, [ex.answers for ex in batch])  # [b, search_k]
            first = hits.argmax(axis=1)
            found[lo: lo + len(batch)] = hits.any(axis=1)
            blocks[lo: lo + len(batch)] = np.where(hits.any(axis=1),
                                                   ids[np.arange(len(batch)), first], ids[:, 0])
            bar.update(len(batch))
    bar.close()
    return blocks, found
