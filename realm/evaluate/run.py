"""Retrieval evaluation: dense (exact inner-product index) or BM25, over a corpus directory."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional, Sequence

import numpy as np

from realm.data.ict import held_out_queries, ict_blocks, split_holdout
from realm.data.qa import QAExample
from realm.data.store import BlockStore
from realm.fsutil import write_lines_atomic
from realm.hub import load_tokenizer
from realm.metrics import answer_hits, gold_hits, recall_at_k
from realm.retrieval.search import DenseSearcher

logger = logging.getLogger(__name__)


def qa_retrieval(searcher, store: BlockStore, qa: list[QAExample], ks: Sequence[int],
                 regex: bool = False, run_file: Optional[str] = None,
                 run_name: str = "realm", hits_out: Optional[dict] = None) -> dict[str, Any]:
    """answer_recall@k (and gold_recall@k when the QA records name a gold passage); with
    ``run_file``, also the ranking as a TREC run file (:func:`write_trec_run`) and its
    judgements beside it (:func:`write_qrels`, at :func:`qrels_path`; the report's ``qrels``);
    with ``hits_out``, the per-question hit matrices (``"answer"``, ``"gold"``: ``[n, k]``) for
    paired comparisons."""
    t0 = time.perf_counter()
    k_max = min(max(ks), len(store))
    scores, ids = searcher.search([ex.question for ex in qa], k_max)  # [n, k] each
    texts = [[store.text(int(i)) for i in row] for row in ids]
    report: dict[str, Any] = {"questions": len(qa), "blocks": len(store)}
    ks = [k for k in ks if k <= k_max]
    hits = answer_hits(texts, [ex.answers for ex in qa], regex=regex)
    if run_file:
        query_ids = [ex.id or str(n) for n, ex in enumerate(qa)]
        write_trec_run(run_file, query_ids, ids, scores, run_name)
        write_qrels(qrels_path(run_file), query_ids, ids, hits)
        report["qrels"] = qrels_path(run_file)
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
    def lines():
        for qid, row_ids, row_scores in zip(query_ids, block_ids, scores):
            qid = str(qid).replace(" ", "_")
            ranked = [(b, s) for b, s in zip(row_ids, row_scores) if b >= 0]
            for rank, (block, score) in enumerate(ranked, 1):
                yield f"{qid} Q0 {int(block)} {rank} {float(score):.6f} {run_name}\n"
    write_lines_atomic(path, lines(), "the run file")


def qrels_path(run_file: str) -> str:
    """Where the judgements of a run file go: beside it, ``run.trec`` -> ``run.qrels``."""
    base, ext = os.path.splitext(run_file)
    return f"{base}.qrels" if ext != ".qrels" else f"{run_file}.qrels"


def write_qrels(path: str, query_ids: Sequence[str], block_ids: np.ndarray,
                hits: np.ndarray) -> None:
    """TREC qrels for a run file (``QID 0 DOCID REL``, as trec_eval, pyserini and ir_measures
    read them): every retrieved block judged, 1 where its text holds an answer (DPR's
    ``has_answer``, the ``hits`` ``[n, k]`` behind answer recall), else 0. The judgements are of
    the retrieved pool only (a block never retrieved is unjudged, which trec_eval counts as not
    relevant), so ``success@k`` from the two files is the report's ``answer_recall@k``.
    Written atomically."""
    def lines():
        for qid, row_ids, row_hits in zip(query_ids, block_ids, hits):
            qid = str(qid).replace(" ", "_")
            judged: dict[int, int] = {}
            for block, hit in zip(row_ids, row_hits):
                if block >= 0:
                    judged[int(block)] = max(judged.get(int(block), 0), int(bool(hit)))
            for block, rel in judged.items():
                yield f"{qid} 0 {block} {rel}\n"
    write_lines_atomic(path, lines(), "the qrels")


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
        ids = searcher.search_tokens([q.query_ids for q in queries], k_max).block_ids
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
        ids = searcher.search(texts, k_max).block_ids
    hits = ids == np.array([q.block_id for q in queries])[:, None]
    ks = [k for k in ks if k <= k_max]
    report = {"queries": len(queries), "blocks": len(store)}
    report.update({f"ict_recall@{k}": round(v, 4) for k, v in recall_at_k(hits, ks).items()})
    report["search_seconds"] = round(time.perf_counter() - t0, 2)
    return report
