"""Retrieval evaluation: dense (exact inner-product index) or BM25, over a corpus directory."""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Optional, Sequence

import numpy as np

from realm.data.ict import held_out_queries, ict_blocks, split_holdout
from realm.data.qa import QAExample
from realm.data.store import BlockStore, check_tokenizer
from realm.hub import load_tokenizer
from realm.index.mips import build_index
from realm.index.mips import search as mips_search
from realm.metrics import answer_hits, gold_hits, recall_at_k
from realm.modeling.embed import embed_blocks, embed_queries, special_ids
from realm.precision import autocast_dtype
from realm.retrieval.fixed import block_bm25

logger = logging.getLogger(__name__)


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

    def search_ids(self, queries: Sequence[Sequence[int]], k: int) -> np.ndarray:
        return self._search(queries, k)[1]

    def _search(self, queries: Sequence[Sequence[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
        q = embed_queries(self.retriever, queries, self.special, self.max_query_tokens,
                          bf16=self.bf16)
        return mips_search(self.index, q, k)

    def search_texts(self, texts: Sequence[str], k: int) -> np.ndarray:
        return self.search_texts_scored(texts, k)[1]

    def search_texts_scored(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner products and block ids of the top ``k`` blocks, ``[n, k]`` each."""
        tok = self.retriever.tokenizer
        return self._search([tok(t, add_special_tokens=False)["input_ids"] for t in texts], k)


class BM25Searcher:
    """BM25 (bm25s) over ``title + text`` of every block."""

    def __init__(self, store: BlockStore) -> None:
        self.bm25 = block_bm25(store)

    def search_texts(self, texts: Sequence[str], k: int) -> np.ndarray:
        return self.search_texts_scored(texts, k)[1]

    def search_texts_scored(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """BM25 scores and block ids of the top ``k`` blocks, ``[n, k]`` each."""
        scores, ids = self.bm25.search(list(texts), k)
        return np.asarray(scores), np.asarray(ids)


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

    def search_texts(self, texts: Sequence[str], k: int) -> np.ndarray:
        return self.search_texts_scored(texts, k)[1]

    def search_texts_scored(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Fused scores and block ids, ``[n, k]`` each (-1 / 0 where fewer were found)."""
        depth = max(self.depth, k)
        rankings = [s.search_texts_scored(texts, depth)[1] for s in self.searchers]
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
        return scores, ids


def qa_retrieval(searcher, store: BlockStore, qa: list[QAExample], ks: Sequence[int],
                 regex: bool = False, run_file: Optional[str] = None,
                 run_name: str = "realm", hits_out: Optional[dict] = None) -> dict[str, Any]:
    """answer_recall@k (and gold_recall@k when the QA records name a gold passage); with
    ``run_file``, also the ranking as a TREC run file (:func:`write_trec_run`); with
    ``hits_out``, the per-question hit matrices (``"answer"``, ``"gold"``: ``[n, k]``) for
    paired comparisons."""
    t0 = time.perf_counter()
    k_max = min(max(ks), len(store))
    scores, ids = searcher.search_texts_scored([ex.question for ex in qa], k_max)  # [n, k]
    if run_file:
        write_trec_run(run_file, [ex.id or str(n) for n, ex in enumerate(qa)], ids, scores,
                       run_name)
    texts = [[store.text(int(i)) for i in row] for row in ids]
    report: dict[str, Any] = {"questions": len(qa), "blocks": len(store)}
    ks = [k for k in ks if k <= k_max]
    hits = answer_hits(texts, [ex.answers for ex in qa], regex=regex)
    report.update({f"answer_recall@{k}": round(v, 4) for k, v in recall_at_k(hits, ks).items()})
    if hits_out is not None:
        hits_out["answer"] = hits
    if all(ex.gold_passage is not None for ex in qa):
        articles = [[store.article_id(int(i)) for i in row] for row in ids]
        gold = gold_hits(articles, [ex.gold_passage for ex in qa])
        if hits_out is not None:
            hits_out["gold"] = gold
        report.update({f"gold_recall@{k}": round(v, 4) for k, v in recall_at_k(gold, ks).items()})
    report["search_seconds"] = round(time.perf_counter() - t0, 2)
    return report


def write_trec_run(path: str, query_ids: Sequence[str], block_ids: np.ndarray,
                   scores: np.ndarray, run_name: str = "realm") -> None:
    """A TREC run file (trec_eval, pyserini, ir_measures): one line per retrieved block,
    ``QID Q0 DOCID RANK SCORE RUN``, ranks from 1; DOCID is the block id in the corpus.
    Written atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for qid, row_ids, row_scores in zip(query_ids, block_ids, scores):
            qid = str(qid).replace(" ", "_")
            rank = 0
            for block, score in zip(row_ids, row_scores):
                if block < 0:
                    continue
                rank += 1
                f.write(f"{qid} Q0 {int(block)} {rank} {float(score):.6f} {run_name}\n")
    os.replace(tmp, path)


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
