"""Held-out span recall: does the retriever find a block the reader could read the span from?

A fixed set of masked sentences (salient spans, as pretraining draws them) from blocks that
pretraining never trains on; each is searched exactly over the whole corpus, embedded by the
retriever being measured, with its **own block left out** (as pretraining leaves it out). A hit
is a retrieved block whose title or body holds the masked word pieces as a run. The run reports
it for the warm-start retriever (``span_recall_start``) and the final one (``span_recall_end``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from realm.data.mlm import MLMDataset, MLMExample, mlm_blocks
from realm.data.store import BlockStore
from realm.index.mips import MipsIndex
from realm.modeling.embed import embed_blocks, embed_queries, special_ids
from realm.modeling.modes import eval_mode
from realm.modeling.readers.lm_inputs import find_window
from realm.modeling.retriever import Retriever
from realm.precision import autocast_dtype


@dataclass
class HeldOutSpans:
    """Held-out masked sentences and the blocks they come from (left out of training)."""

    examples: list[MLMExample]
    blocks: np.ndarray  # [n] int64 block ids of the examples store

    @classmethod
    def draw(cls, store: BlockStore, mask_id: int, n: int, max_query_tokens: int,
             seed: int = 0) -> "HeldOutSpans":
        """``n`` blocks with a salient span (at most a fifth of them, so that training keeps the
        rest), at random (``seed``), one masked sentence each."""
        candidates = mlm_blocks(store, with_spans=True)  # blocks with a salient span
        rng = np.random.default_rng(seed + 7919)  # (not the training sampler's stream)
        size = min(n, len(candidates) // 5)
        blocks = np.sort(rng.choice(candidates, size=size, replace=False))
        dataset = MLMDataset(store, mask_id, block_ids=blocks, masking="salient_span",
                             max_query_tokens=max_query_tokens, seed=seed)
        return cls([dataset[i] for i in range(len(dataset))], blocks.astype(np.int64))


def holds_run(store: BlockStore, block: int, run: np.ndarray) -> bool:
    """Whether block ``block``'s title or body holds the word pieces ``run`` contiguously."""
    return (find_window(store.body_ids(block), run) >= 0
            or find_window(store.title_ids(block), run) >= 0)


def span_recall(retriever: Retriever, store: BlockStore, held: HeldOutSpans, k: int,
                max_block_tokens: int, max_query_tokens: int, precision: str = "auto",
                examples_store: Optional[BlockStore] = None) -> float:
    """Share of ``held``'s examples whose top ``k`` blocks of ``store`` (their own block left
    out when the examples come from ``store`` itself) hold their masked span."""
    if not held.examples:
        return float("nan")
    return float(np.mean(span_hits(retriever, store, held, k, max_block_tokens,
                                   max_query_tokens, precision, examples_store)))


def span_hits(retriever: Retriever, store: BlockStore, held: HeldOutSpans, k: int,
              max_block_tokens: int, max_query_tokens: int, precision: str = "auto",
              examples_store: Optional[BlockStore] = None) -> np.ndarray:
    """Per held-out example, whether its top ``k`` blocks hold its span: ``[n]`` bool, in
    ``held``'s order (two retrievers' hits pair up for a sign test,
    :func:`realm.metrics.paired_recall`)."""
    return span_hit_ranks(retriever, store, held, k, max_block_tokens, max_query_tokens,
                          precision, examples_store).any(axis=1)


def span_hit_ranks(retriever: Retriever, store: BlockStore, held: HeldOutSpans, k: int,
                   max_block_tokens: int, max_query_tokens: int, precision: str = "auto",
                   examples_store: Optional[BlockStore] = None) -> np.ndarray:
    """Per held-out example and rank, whether the block found there holds its span:
    ``[n, k]`` bool (the hit matrix :func:`realm.metrics.recall_at_k` and
    :func:`realm.metrics.paired_recall` read)."""
    if not held.examples:
        return np.zeros((0, k), dtype=bool)
    device = next(retriever.parameters()).device
    bf16 = autocast_dtype(precision, device) == "bf16"
    special = special_ids(retriever.tokenizer)
    with eval_mode(retriever), torch.no_grad():
        emb, _ = embed_blocks(retriever, store, special, max_block_tokens=max_block_tokens,
                              bf16=bf16, progress=False)  # [n_blocks, dim]
        queries = embed_queries(retriever, [e.query_ids for e in held.examples], special,
                                max_query_tokens, bf16=bf16)  # [n, dim]
    index = MipsIndex.build(emb)
    own = examples_store is None or examples_store is store
    found = index.search(queries, k, exclude=held.blocks if own else None).block_ids  # [n, k]
    return np.array([[b >= 0 and holds_run(store, int(b), np.asarray(e.target_ids, np.int64))
                      for b in row] for e, row in zip(held.examples, found)], dtype=bool)
