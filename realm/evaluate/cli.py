"""``python launch/evaluate.py MODE ...``: Open-QA models, retrievers and ICT held-out sentences
evaluated over a corpus directory, and two prediction files compared (flags in
:mod:`realm.evaluate.args`, usage in ``launch/evaluate.py``).

The last stdout line is one JSON object; a bad input is one ``evaluate: error: ...`` line on
stderr and exit code 1 (bad flags: the parser's usage error, exit code 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import torch

from realm.cli import emit_summary, setup_logging
from realm.data.qa import read_qa
from realm.data.store import BlockStore
from realm.errors import CorpusError, QAFormatError, WriteError
from realm.evaluate.args import parse_args
from realm.evaluate.openqa import evaluate_openqa, write_predictions
from realm.hub import run_part
from realm.retrieval.search import BM25Searcher, DenseSearcher, FusionSearcher, trained_lengths
from realm.evaluate.run import ict_retrieval, qa_retrieval
from realm.evaluate.span_recall import HeldOutSpans, span_hit_ranks
from realm.metrics import compare_predictions, paired_recall, recall_at_k
from realm.precision import autocast_dtype
from realm.retrieval.fixed import load_openqa_model
from realm.modeling.retriever import load_retriever


def main(argv: Optional[Sequence[str]] = None) -> int:
    _, args, ks = parse_args(argv)
    setup_logging("INFO")
    if args.mode == "compare":
        try:
            report = compare_predictions(args.before, args.after)
        except (OSError, ValueError) as err:
            print(f"evaluate: error: {err}", file=sys.stderr)
            return 1
        emit_summary({"mode": "compare", "before": args.before, "after": args.after, **report})
        return 0
    t0 = time.perf_counter()
    if args.mode == "openqa":
        return _openqa(args, ks, t0)
    return _retrieval(args, ks, t0)


def _retrieval(args: argparse.Namespace, ks: list[int], t0: float) -> int:
    """``retrieval`` and ``ict``: a retriever (or BM25, or both fused) over the corpus."""
    try:
        store = BlockStore(args.corpus)
        qa = read_qa(args.qa, args.limit, regex=args.regex) if args.mode == "retrieval" else None

        def dense(path: str) -> DenseSearcher:
            queries, blocks = 64, 288  # a bare checkpoint's (DenseSearcher's defaults)
            saved = run_part(path, "retriever")
            if os.path.isfile(os.path.join(saved, "manifest.json")):
                queries, blocks = trained_lengths(saved, store)  # what it was trained with
            return DenseSearcher(load_retriever(path, args.dim, args.pooling), store,
                                 args.max_block_tokens or blocks, queries,
                                 progress=not args.no_progress, precision=args.precision)

        if args.bm25:
            searcher, name = BM25Searcher(store), "bm25"
        else:
            searcher, name = dense(args.retriever), args.retriever
            if getattr(args, "fuse_bm25", False):
                searcher = FusionSearcher([searcher, BM25Searcher(store)])
                name = f"rrf({args.retriever}, bm25)"
        if args.mode == "retrieval":
            hits = {}
            report = qa_retrieval(searcher, store, qa, ks, regex=args.regex,
                                  run_file=args.run_file,
                                  run_name="bm25" if args.bm25 else "realm", hits_out=hits)
            if args.run_file:
                report["run_file"] = args.run_file
            if args.compare_with:
                before = {}
                other = (BM25Searcher(store) if args.compare_with == "bm25"
                         else dense(args.compare_with))
                qa_retrieval(other, store, qa, ks, regex=args.regex, hits_out=before)
                ks_in = [k for k in ks if k <= hits["answer"].shape[1]]
                report["paired"] = {"before": args.compare_with, **{
                    kind: paired_recall(before[kind], hits[kind], ks_in) for kind in hits}}
        elif args.mode == "spans":
            report = held_out_spans(args, store, ks)
        else:
            report = ict_retrieval(searcher, store, args.holdout, args.seed, ks, args.limit)
    except (QAFormatError, CorpusError, ValueError, WriteError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 1
    precision = "bf16" if getattr(searcher, "bf16", False) else ("fp32" if not args.bm25 else None)
    emit_summary({"mode": args.mode, "retriever": name, "corpus": args.corpus,
                  "precision": precision, **report,
                  "seconds": round(time.perf_counter() - t0, 2)})
    return 0


def held_out_spans(args: argparse.Namespace, store: BlockStore, ks: list[int]) -> dict:
    """``spans``: span recall@k of ``--retriever`` on the run's held-out masked sentences
    (:mod:`realm.evaluate.span_recall`), paired with ``--compare-with``'s."""
    if args.bm25:
        raise ValueError("spans: give --retriever DIR (held-out span recall is of a dense "
                         "retriever)")

    def ranks(path: str):
        retriever = load_retriever(path, args.dim, args.pooling)
        held = HeldOutSpans.draw(store, retriever.tokenizer.mask_token_id, args.examples,
                                 args.max_query_tokens, args.seed)
        return span_hit_ranks(retriever, store, held, max(ks), args.max_block_tokens,
                              args.max_query_tokens, args.precision), len(held.examples)

    hits, n = ranks(args.retriever)
    report: dict = {"examples": n, "span_recall": recall_at_k(hits, ks)}
    if args.compare_with:
        before, _ = ranks(args.compare_with)
        report["paired"] = {"before": args.compare_with, **paired_recall(before, hits, ks)}
    return report


def _openqa(args: argparse.Namespace, ks: list[int], t0: float) -> int:
    """``openqa``: a fine-tuned model's EM, F1 and answer recall; writes its predictions."""
    try:
        store = BlockStore(args.corpus)
        qa = read_qa(args.qa, args.limit, regex=args.regex)
        model = load_openqa_model(args.model, store, args.max_block_tokens,
                                  progress=not args.no_progress, precision=args.precision)
    except (QAFormatError, CorpusError, ValueError, FileNotFoundError, WriteError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 1
    model.regex = args.regex  # the QA file's answers, whatever the model was trained on
    if args.read is not None:
        if args.read < 1:
            print(f"evaluate: error: --read must be >= 1, got {args.read}", file=sys.stderr)
            return 1
        model.k = args.read
    generative = getattr(model, "reader_type", "extractive") == "generative"
    if (args.decoding or args.beam_size) and not generative:
        print("evaluate: error: --decoding and --beam-size are for a generative model; "
              f"{args.model} reads spans", file=sys.stderr)
        return 1
    if args.beam_size is not None and args.beam_size < 1:
        print(f"evaluate: error: --beam-size must be >= 1, got {args.beam_size}", file=sys.stderr)
        return 1
    if generative:
        model.decoding = args.decoding or model.decoding
        model.beam_size = args.beam_size or model.beam_size
    bf16 = autocast_dtype(args.precision, torch.device("cpu")) == "bf16"
    report, records = evaluate_openqa(model, qa, ks, args.batch_size, bf16,
                                      progress=not args.no_progress)
    name = os.path.splitext(os.path.basename(args.qa))[0]
    path = args.predictions or os.path.join(os.path.dirname(os.path.abspath(args.model)),
                                            f"predictions-{name}.jsonl")
    write_predictions(records, path)
    retrieval = ("none" if getattr(model, "closed_book", False)
                 else "dense" if model.dense else "bm25")
    emit_summary({"mode": "openqa", "model": args.model,
                  "reader_type": "generative" if generative else "extractive",
                  **({"decoding": model.decoding, "beam_size": model.beam_size}
                     if generative else {}),
                  "retrieval": retrieval, "corpus": args.corpus, "qa": args.qa,
                  "precision": "bf16" if bf16 else "fp32", **report, "predictions": path,
                  "total_seconds": round(time.perf_counter() - t0, 2)})
    return 0
