"""One searcher protocol for every index: ``search(queries, k) -> SearchResult``.

Whatever answers "the top k blocks for these queries" in realm answers it the same way (Atlas's
``search_knn`` is the model): one method, ``search(queries, k)`` (plus ``exclude`` where an index
can leave blocks out), returning one type, :class:`SearchResult` (``scores``, ``block_ids``,
each ``[n_queries, k]``, best first, -1 where fewer were found). The queries are texts for the
searchers below (dense, BM25, fused), embeddings ``[n, dim]`` for the indexes under them:

==========================================  =============  ===================================
searcher                                    queries        where
==========================================  =============  ===================================
:class:`DenseSearcher`                      texts          a retriever over every block
:class:`BM25Searcher`                       texts          BM25 over title + text
:class:`FusionSearcher`                     texts          reciprocal rank fusion of several
:class:`realm.retrieval.fixed.BM25Index`    texts          Open-QA's fixed BM25 index
:class:`realm.retrieval.fixed.DenseIndex`   embeddings     Open-QA's fixed index (scores with
                                                           grad to the query encoder)
:class:`realm.index.mips.MipsIndex`         embeddings     exact or any faiss factory string
:class:`realm.index.generations.Generation` embeddings     a committed index generation
:class:`realm.index.sharded.ShardedSearch`  embeddings     a generation sharded over ranks
:class:`realm.refresh.watcher.IndexWatcher` embeddings     the generation in use (hot swap)
==========================================  =============  ===================================
"""

from __future__ import annotations

import collections
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from realm.data.store import BlockStore, check_tokenizer
from realm.index.mips import SearchResult, build_index
from realm.index.mips import search as mips_search
from realm.modeling.embed import embed_blocks, embed_queries, special_ids
from realm.precision import autocast_dtype
from realm.retrieval.bm25 import BM25Retriever


@runtime_checkable
class Searcher(Protocol):
    """Anything that returns the top ``k`` blocks for a batch of queries."""

    def search(self, queries: Any, k: int) -> SearchResult:
        """Top ``k`` blocks per query: ``SearchResult(scores [n, k], block_ids [n, k])``."""


def block_bm25(store: BlockStore) -> BM25Retriever:
    """BM25 (bm25s) over ``title + text`` of every block of ``store``."""
    texts = [f"{store.title(i)} {store.text(i)}" for i in range(len(store))]
    return BM25Retriever.build(texts)


class DenseSearcher:
    """Embeds every block with the document encoder once; exact inner-product search.

    ``precision``: ``auto`` (bf16 autocast where the device runs it fast, as the refresher does),
    ``bf16`` or ``fp32``.
    """

    def __init__(self, retriever, store: BlockStore, max_block_tokens: int = 288,
                 max_query_tokens: int = 64, progress: bool = True,
                 precision: str = "auto") -> None:
        check_tokenizer(retriever.tokenizer, store)
        self.retriever, self.store = retriever, store
        self.special = special_ids(retriever.tokenizer)
        self.max_query_tokens = max_query_tokens
        device = next(retriever.parameters()).device
        self.bf16 = autocast_dtype(precision, device) == "bf16"
        reps, self.embed_stats = embed_blocks(retriever, store, self.special,
                                              max_block_tokens=max_block_tokens, progress=progress,
                                              bf16=self.bf16)
        self.index = build_index(reps)

    def search(self, queries: Sequence[str], k: int) -> SearchResult:
        """Inner products and block ids of the top ``k`` blocks, ``[n, k]`` each."""
        tok = self.retriever.tokenizer
        return self.search_tokens([tok(t, add_special_tokens=False)["input_ids"] for t in queries],
                                  k)

    def search_tokens(self, queries: Sequence[Sequence[int]], k: int) -> SearchResult:
        """As :meth:`search`, for queries already cut into the retriever's word pieces."""
        q = embed_queries(self.retriever, queries, self.special, self.max_query_tokens,
                          bf16=self.bf16)
        return mips_search(self.index, q, k)


class BM25Searcher:
    """BM25 (bm25s) over ``title + text`` of every block."""

    def __init__(self, store: BlockStore) -> None:
        self.bm25 = block_bm25(store)

    def search(self, queries: Sequence[str], k: int) -> SearchResult:
        """BM25 scores and block ids of the top ``k`` blocks, ``[n, k]`` each."""
        return self.bm25.search(list(queries), k)


class FusionSearcher:
    """Reciprocal rank fusion (Cormack et al. 2009) of several searchers, e.g. BM25 and a dense
    retriever: each ranks its top ``depth`` blocks, a block scores ``sum 1 / (k_rrf + rank)``
    over the rankings it appears in (rank from 1), and the fused top k are returned. RRF needs
    no score calibration between BM25 and inner products, and no weight to tune.
    """

    def __init__(self, searchers: Sequence[Any], depth: int = 100, k_rrf: int = 60) -> None:
        if len(searchers) < 2:
            raise ValueError("fusion needs at least two searchers")
        self.searchers, self.depth, self.k_rrf = list(searchers), depth, k_rrf

    def search(self, queries: Sequence[str], k: int) -> SearchResult:
        """Fused scores and block ids, ``[n, k]`` each (-1 / 0 where fewer were found)."""
        texts = queries
        depth = max(self.depth, k)
        rankings = [s.search(texts, depth).block_ids for s in self.searchers]
        scores = np.zeros((len(texts), k), np.float64)
        ids = np.full((len(texts), k), -1, np.int64)
        for q in range(len(texts)):
            fused: dict[int, float] = collections.defaultdict(float)
            for ranking in rankings:
                for rank, block in enumerate(int(b) for b in ranking[q] if b >= 0):
                    fused[block] += 1.0 / (self.k_rrf + rank + 1)
            best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
            ids[q, : len(best)] = [b for b, _ in best]
            scores[q, : len(best)] = [s for _, s in best]
        return SearchResult(scores, ids)


__all__ = ["BM25Searcher", "DenseSearcher", "FusionSearcher", "SearchResult", "Searcher",
           "block_bm25"]
