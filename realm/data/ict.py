"""Inverse Cloze Task examples (Lee et al. 2019): a sentence is the query, its block the positive.

The sentence is removed from the positive block with probability ``remove_prob`` (0.9), so the
retriever learns to match meaning rather than only words; the other blocks of the batch (of every
rank, when training on several) are the negatives. Sentences come from the block store's
per-block sentence ranges, so nothing is re-tokenized.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from realm.data.store import BlockStore


@dataclasses.dataclass
class ICTExample:
    """One query sentence and its (possibly sentence-less) block, as word-piece ids."""

    block_id: int
    query_ids: np.ndarray
    title_ids: np.ndarray
    body_ids: np.ndarray


def ict_blocks(store: BlockStore, min_sentences: int = 2, min_query_tokens: int = 5) -> np.ndarray:
    """Ids of blocks with at least ``min_sentences`` sentences, one of them long enough for a query."""
    n_sents = np.asarray(store.blocks["n_sents"])
    keep = []
    for i in np.nonzero(n_sents >= min_sentences)[0]:
        sents = store.sentences(int(i))
        if np.any(sents["end"] - sents["start"] >= min_query_tokens):
            keep.append(int(i))
    return np.asarray(keep, dtype=np.int64)


def split_holdout(block_ids: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random split of ``block_ids`` into (train, held-out) with ``holdout`` held out."""
    if not 0 <= holdout < len(block_ids):
        raise ValueError(f"holdout must be in [0, {len(block_ids)}), got {holdout}")
    perm = np.random.default_rng(seed).permutation(len(block_ids))
    return np.sort(block_ids[perm[holdout:]]), np.sort(block_ids[perm[:holdout]])


class ICTDataset(torch.utils.data.Dataset):
    """ICT examples over a set of blocks; example ``i`` is a pure function of (seed, epoch, i).

    Args:
        store: The block store.
        block_ids: Blocks to draw from (see :func:`ict_blocks`).
        remove_prob: Probability that the query sentence is removed from its block.
        max_query_tokens: Query sentences are cut to this many word pieces.
        min_query_tokens: Shorter sentences are never chosen as queries.
        seed: Base seed; call :meth:`set_epoch` so each epoch draws new sentences.
    """

    def __init__(self, store: BlockStore, block_ids: Sequence[int], remove_prob: float = 0.9,
                 max_query_tokens: int = 64, min_query_tokens: int = 5, seed: int = 0) -> None:
        if not 0.0 <= remove_prob <= 1.0:
            raise ValueError(f"remove_prob must be in [0, 1], got {remove_prob}")
        self.store = store
        self.block_ids = np.asarray(block_ids, dtype=np.int64)
        self.remove_prob = remove_prob
        self.max_query_tokens = max_query_tokens
        self.min_query_tokens = min_query_tokens
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.block_ids)

    def __getitem__(self, i: int) -> ICTExample:
        block_id = int(self.block_ids[i])
        rng = np.random.default_rng((self.seed, self.epoch, block_id))
        body = np.asarray(self.store.body_ids(block_id), dtype=np.int64)
        sents = self.store.sentences(block_id)
        long_enough = np.nonzero(sents["end"] - sents["start"] >= self.min_query_tokens)[0]
        if len(long_enough) == 0:
            raise ValueError(f"block {block_id} has no sentence of >= {self.min_query_tokens} "
                             "word pieces; filter blocks with ict_blocks()")
        s = sents[int(rng.choice(long_enough))]
        start, end = int(s["start"]), int(s["end"])
        query = body[start: min(end, start + self.max_query_tokens)]
        if rng.random() < self.remove_prob:
            body = np.concatenate([body[:start], body[end:]])
        return ICTExample(block_id, query, np.asarray(self.store.title_ids(block_id), np.int64), body)


def held_out_queries(store: BlockStore, block_ids: Sequence[int], seed: int = 0,
                     max_query_tokens: int = 64, min_query_tokens: int = 5) -> list[ICTExample]:
    """One query sentence per held-out block, the block left whole (for recall@k evaluation)."""
    ds = ICTDataset(store, block_ids, remove_prob=0.0, max_query_tokens=max_query_tokens,
                    min_query_tokens=min_query_tokens, seed=seed)
    return [ds[i] for i in range(len(ds))]


