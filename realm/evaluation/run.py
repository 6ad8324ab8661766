"""Retrieval evaluation: dense (exact inner-product index) or BM25, over a corpus directory."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

import numpy as np

from realm.data.ict import held_out_queries, ict_blocks, split_holdout
from realm.data.qa import QAExample
from realm.data.store import BlockStore
from realm.evaluation.bm25 import BM25Retriever
from realm.evaluation.retrieval import answer_hits, gold_hits, recall_at_k

logger = logging.getLogger(__name__)


class DenseSearcher:
    """Embeds every block with the document encoder once; exact inner-product search."""

    def __init__(self, retriever, store: BlockStore, max_block_tokens: int = 288,
                 max_query_tokens: int = 64, progress: bool = True) -> None:
        from realm.index.embed import embed_blocks, special_ids
        from realm.index.mips import build_index
        from realm.training.ict import check_tokenizer

        check_tokenizer(retriever.tokenizer, store)
        self.retriever, self.store = retriever, store
        self.special = special_ids(retriever.tokenizer)
        self.max_query_tokens = max_query_tokens
        reps, self.embed_stats = embed_blocks(retriever, store, self.special,
                                              max_block_tokens=max_block_tokens, progress=progress)
        self.index = build_index(reps)

    def search_ids(self, queries: Sequence[Sequence[int]], k: int) -> np.ndarray:
        from realm.index.embed import embed_queries
        from realm.index.mips import search

        q = embed_queries(self.retriever, queries, self.special, self.max_query_tokens)
        return search(self.index, q, k)[1]

    def search_texts(self, texts: Sequence[str], k: int) -> np.ndarray:
        tok = self.retriever.tokenizer
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        return self.search_ids(ids, k)


class BM25Searcher:
    """BM25 (bm25s) over ``title + text`` of every block."""

    def __init__(self, store: BlockStore) -> None:
        texts = [f"{store.title(i)} {store.text(i)}" for i in range(len(store))]
        self.bm25 = BM25Retriever.build(texts)

    def search_texts(self, texts: Sequence[str], k: int) -> np.ndarray:
        return self.bm25.search(list(texts), k)[1]


def qa_retrieval(searcher, store: BlockStore, qa: list[QAExample], ks: Sequence[int],
                 regex: bool = False) -> dict[str, Any]:
    """answer_recall@k (and gold_recall@k when the QA records name a gold passage)."""
    t0 = time.perf_counter()
    k_max = min(max(ks), len(store))
    ids = searcher.search_texts([ex.question for ex in qa], k_max)  # [n, k]
    texts = [[store.text(int(i)) for i in row] for row in ids]
    report: dict[str, Any] = {"questions": len(qa), "blocks": len(store)}
    ks = [k for k in ks if k <= k_max]
    hits = answer_hits(texts, [ex.answers for ex in qa], regex=regex)
    report.update({f"answer_recall@{k}": round(v, 4) for k, v in recall_at_k(hits, ks).items()})
    if all(ex.gold_passage is not None for ex in qa):
        articles = [[store.article_id(int(i)) for i in row] for row in ids]
        gold = gold_hits(articles, [ex.gold_passage for ex in qa])
        report.update({f"gold_recall@{k}": round(v, 4) for k, v in recall_at_k(gold, ks).items()})
    report["search_seconds"] = round(time.perf_counter() - t0, 2)
    return report


def ict_sentences(store: BlockStore, holdout: int, seed: int, n: Optional[int] = None):
    """Held-out blocks (the ICT stage's split for ``holdout``/``seed``) and one query each."""
    blocks = ict_blocks(store)
    _, held = split_holdout(blocks, holdout, seed)
    if n is not None:
        held = held[:n]
    return held, held_out_queries(store, held, seed)


def ict_retrieval(searcher, store: BlockStore, holdout: int, seed: int, ks: Sequence[int],
                  n: Optional[int] = None) -> dict[str, Any]:
    """Held-out ICT sentences -> their source block among all blocks: recall@k."""
    t0 = time.perf_counter()
    held, queries = ict_sentences(store, holdout, seed, n)
    k_max = min(max(ks), len(store))
    if isinstance(searcher, DenseSearcher):
        ids = searcher.search_ids([q.query_ids for q in queries], k_max)
    else:  # BM25 needs the sentence as text: cut it from the block text by token offsets
        from realm.hub import load_tokenizer

        tok = load_tokenizer(store.manifest["tokenizer"]["path"])
        texts = []
        for q in queries:
            text = store.text(q.block_id)
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            body = enc["input_ids"]
            start = next(j for j in range(len(body)) if body[j:j + len(q.query_ids)] == q.query_ids.tolist())
            offs = enc["offset_mapping"]
            texts.append(text[offs[start][0]: offs[start + len(q.query_ids) - 1][1]])
        ids = searcher.search_texts(texts, k_max)
    hits = ids == np.array([q.block_id for q in queries])[:, None]
    ks = [k for k in ks if k <= k_max]
    report = {"queries": len(queries), "blocks": len(store)}
    report.update({f"ict_recall@{k}": round(v, 4) for k, v in recall_at_k(hits, ks).items()})
    report["search_seconds"] = round(time.perf_counter() - t0, 2)
    return report
