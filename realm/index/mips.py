"""Maximum inner-product search over block embeddings with faiss (chosen by factory string)."""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def build_index(embeddings: np.ndarray, factory: str = "Flat"):  # -> faiss.Index
    """An inner-product faiss index over ``embeddings [n, dim]`` (``Flat``: exact search)."""
    import faiss

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.index_factory(embeddings.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(embeddings)
    index.add(embeddings)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ``(scores [n, k] float32, ids [n, k] int64)``; ``k`` is capped at the index size."""
    k = min(k, index.ntotal)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, ids
