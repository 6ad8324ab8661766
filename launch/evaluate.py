"""Evaluate Open-QA models and retrieval over a corpus directory.

    python launch/evaluate.py openqa --model RUN/model --corpus DIR --qa FILE [--regex]
    python launch/evaluate.py retrieval --retriever DIR --corpus DIR --qa FILE --k 1,5,20,100
    python launch/evaluate.py retrieval --bm25 --corpus DIR --qa FILE
    python launch/evaluate.py retrieval --retriever RUN_DIR --compare-with WARM_START_DIR|bm25 \
        --corpus DIR --qa FILE         # paired: questions gained / lost, sign test
    python launch/evaluate.py ict --retriever DIR --corpus DIR [--holdout 500 --seed 0]
    python launch/evaluate.py title-recall --retriever DIR --queries DIR --corpus DIR --k 1,5,20 \
        [--compare-with BEFORE_DIR]
    python launch/evaluate.py compare BEFORE/predictions-dev.jsonl AFTER/predictions-dev.jsonl

Each mode has its own help (`python launch/evaluate.py retrieval --help`). `--retriever` takes a
saved retriever directory, a run directory (pretraining, ICT, DPR: its `retriever/`) or any
transformers checkpoint (fresh projection). `retrieval --run-file FILE` also writes a TREC run
file.
`openqa` reads a fine-tuned model (launch/finetune_openqa.py writes RUN/model) and writes its
predictions (question, prediction, gold, retrieved titles and scores) as jsonl, by default
beside the model. `title-recall --compare-with` also scores a second retriever (e.g. the warm
start of a pretraining run) on the same queries and reports, per k, the queries each one hits
that the other misses and the exact sign test's p-value (`paired`). The last stdout line is one
JSON object (EM/F1, recall@k, counts, seconds). `compare` reads two Open-QA predictions files of
the same questions and reports each one's EM and F1 and the questions each answers exactly that the
other does not, with the sign test's p-value.
"""

import argparse
import os
import re
import sys
import time

from realm.cli import emit_summary, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per evaluation, each with its own flags and help."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--corpus", required=True, help="corpus directory (searched)")
    common.add_argument("--k", default="1,5,20,100", help="comma-separated cut-offs")
    common.add_argument("--max-block-tokens", type=int, default=288,
                        help="word pieces of a block when embedding it")
    common.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="dense encoders: bf16 autocast where the device runs it fast (auto)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    searcher = argparse.ArgumentParser(add_help=False)
    searcher.add_argument("--retriever",
                          help="retriever directory, pretraining/ICT/DPR run directory, or any "
                               "transformers checkpoint (fresh projection)")
    searcher.add_argument("--bm25", action="store_true", help="BM25 (bm25s) instead of a retriever")
    searcher.add_argument("--dim", type=int, default=128,
                          help="projection size for a bare checkpoint")
    searcher.add_argument("--pooling", default="mean", choices=["cls", "mean", "last"],
                          help="pooling for a bare checkpoint")

    p = sub.add_parser("openqa", parents=[common], help="EM/F1 of a fine-tuned Open-QA model",
                       description="EM, F1 and answer recall of a fine-tuned Open-QA model "
                                   "(launch/finetune_openqa.py's RUN/model); writes predictions.")
    p.add_argument("--model", required=True, help="the fine-tuned model directory (RUN/model)")
    p.add_argument("--qa", required=True, help="QA jsonl ({question, answers})")
    p.add_argument("--regex", action="store_true", help="answers are regular expressions")
    p.add_argument("--limit", type=int, help="the first N questions only")
    p.add_argument("--predictions", help="predictions jsonl (default MODEL/../predictions-QA.jsonl)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per batch")
    p.add_argument("--read", type=int, default=None,
                   help="blocks the reader reads per question (default: the model's k)")

    p = sub.add_parser("retrieval", parents=[common, searcher],
                       help="answer recall@k of a retriever or BM25 on a QA file",
                       description="Answer recall@k (DPR's has_answer on the block text; gold "
                                   "recall@k when the records name a gold passage).")
    p.add_argument("--qa", required=True, help="QA jsonl ({question, answers[, gold_passage]})")
    p.add_argument("--regex", action="store_true", help="answers are regular expressions")
    p.add_argument("--limit", type=int, help="the first N questions only")
    p.add_argument("--compare-with", metavar="RETRIEVER_DIR|bm25",
                   help="a second retriever (or bm25) on the same questions; reports per k the "
                        "questions each answers that the other misses and the sign test's "
                        "p-value (`paired`)")
    p.add_argument("--fuse-bm25", action="store_true",
                   help="with --retriever: reciprocal rank fusion of the retriever and BM25 "
                        "(each ranks its top 100)")
    p.add_argument("--run-file", metavar="FILE",
                   help="also write the ranking as a TREC run file (QID Q0 BLOCK_ID RANK SCORE "
                        "RUN) for trec_eval, pyserini or ir_measures")

    p = sub.add_parser("ict", parents=[common, searcher],
                       help="recall@k of held-out ICT sentences",
                       description="Held-out ICT sentences (the ICT run's own split) -> their "
                                   "block among all blocks: recall@k.")
    p.add_argument("--holdout", type=int, default=500, help="ict.holdout_blocks of the run")
    p.add_argument("--seed", type=int, default=0, help="seed of the run")
    p.add_argument("--limit", type=int, help="the first N held-out sentences only")

    p = sub.add_parser("title-recall", parents=[common, searcher],
                       help="masked queries -> a block of their own article: recall@k",
                       description="Salient-span-masked queries (as in pretraining) from --queries;"
                                   " recall@k of a block of the query's article (title) among "
                                   "--corpus.")
    p.add_argument("--queries", required=True, help="corpus the masked queries come from")
    p.add_argument("--masking", default="salient_span",
                   choices=["salient_span", "random_span", "random_token"],
                   help="masking of the queries (as in pretraining)")
    p.add_argument("--max-query-tokens", type=int, default=64,
                   help="word pieces in a query (retriever.max_query_tokens)")
    p.add_argument("--limit", type=int, help="N random queries")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks")
    p.add_argument("--compare-with", metavar="RETRIEVER_DIR",
                   help="a second retriever scored on the same queries; reports the paired "
                        "difference (gained, lost, sign-test p-value)")
    p = sub.add_parser("compare", help="two Open-QA predictions files: paired exact match",
                       description="Two predictions-*.jsonl of the same questions (evaluate.py "
                                   "openqa, or a fine-tune's predictions-dev.jsonl): EM and F1 "
                                   "of each, questions gained / lost, exact sign test.")
    p.add_argument("before", help="predictions of the baseline")
    p.add_argument("after", help="predictions of the system compared with it")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging("INFO")
    if args.mode == "compare":
        from realm.evaluation.retrieval import compare_predictions

        try:
            report = compare_predictions(args.before, args.after)
        except (OSError, ValueError) as err:
            print(f"evaluate: error: {err}", file=sys.stderr)
            return 1
        emit_summary({"mode": "compare", "before": args.before, "after": args.after, **report})
        return 0
    if args.mode != "openqa" and args.bm25 == bool(args.retriever):
        parser.error(f"{args.mode}: give exactly one of --retriever DIR or --bm25")
    if getattr(args, "fuse_bm25", False) and not args.retriever:
        parser.error("--fuse-bm25 goes with --retriever DIR (BM25 is the other ranking)")
    if args.mode == "title-recall" and args.compare_with and args.bm25:
        parser.error("--compare-with goes with title-recall --retriever")
    try:
        ks = sorted({int(k) for k in args.k.split(",")})
    except ValueError:
        parser.error(f"--k: expected comma-separated integers, got {args.k!r}")
    if args.max_block_tokens < 1:
        parser.error(f"--max-block-tokens: at least 1, got {args.max_block_tokens}")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        parser.error(f"--limit: at least 1 question, got {args.limit}")
    for flag in ("retriever", "compare_with"):  # a directory, or a hub id ("org/name")
        path = getattr(args, flag, None)
        if (path and path != "bm25" and not os.path.isdir(path)
                and not re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", path)):
            parser.error(f"--{flag.replace('_', '-')}: {path}: no such directory")

    from realm.data.qa import QAFormatError, read_qa
    from realm.data.store import BlockStore, CorpusError
    from realm.evaluation.run import (
        BM25Searcher,
        DenseSearcher,
        ict_retrieval,
        qa_retrieval,
        title_recall,
    )

    t0 = time.perf_counter()
    if args.mode == "openqa":
        return _openqa(args, ks, t0)
    try:
        store = BlockStore(args.corpus)
        qa = read_qa(args.qa, args.limit, regex=args.regex) if args.mode == "retrieval" else None
        def dense(path: str) -> DenseSearcher:
            from realm.training.ict import load_retriever

            return DenseSearcher(load_retriever(path, args.dim, args.pooling), store,
                                 args.max_block_tokens, progress=not args.no_progress,
                                 precision=args.precision)

        if args.bm25:
            searcher, name = BM25Searcher(store), "bm25"
        else:
            searcher, name = dense(args.retriever), args.retriever
            if getattr(args, "fuse_bm25", False):
                from realm.evaluation.run import FusionSearcher

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
                from realm.evaluation.retrieval import paired_recall

                before = {}
                other = (BM25Searcher(store) if args.compare_with == "bm25"
                         else dense(args.compare_with))
                qa_retrieval(other, store, qa, ks, regex=args.regex, hits_out=before)
                ks_in = [k for k in ks if k <= hits["answer"].shape[1]]
                report["paired"] = {"before": args.compare_with, **{
                    kind: paired_recall(before[kind], hits[kind], ks_in) for kind in hits}}
        elif args.mode == "title-recall":
            queries = BlockStore(args.queries)
            options = dict(masking=args.masking, n=args.limit, seed=args.seed,
                           max_query_tokens=args.max_query_tokens)
            hits: dict = {}
            report = title_recall(searcher, queries, store, ks, hits_out=hits, **options)
            report = {"queries_corpus": args.queries, **report}
            if args.compare_with:
                from realm.evaluation.retrieval import paired_recall

                before: dict = {}
                title_recall(dense(args.compare_with), queries, store, ks, hits_out=before,
                             **options)
                ks_in = [k for k in ks if k <= hits["title"].shape[1]]
                report["paired"] = {"before": args.compare_with, **{
                    kind: paired_recall(before[kind], hits[kind], ks_in) for kind in hits}}
        else:
            report = ict_retrieval(searcher, store, args.holdout, args.seed, ks, args.limit)
    except (QAFormatError, CorpusError, ValueError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 1
    precision = "bf16" if getattr(searcher, "bf16", False) else ("fp32" if not args.bm25 else None)
    emit_summary({"mode": args.mode, "retriever": name, "corpus": args.corpus,
                  "precision": precision, **report,
                  "seconds": round(time.perf_counter() - t0, 2)})
    return 0


def _openqa(args, ks, t0) -> int:
    import os

    from realm.data.qa import QAFormatError, read_qa
    from realm.data.store import BlockStore, CorpusError
    from realm.training.core import autocast_dtype
    from realm.training.openqa import evaluate_openqa, load_openqa_model, write_predictions

    try:
        store = BlockStore(args.corpus)
        qa = read_qa(args.qa, args.limit, regex=args.regex)
        model = load_openqa_model(args.model, store, args.max_block_tokens,
                                  progress=not args.no_progress, precision=args.precision)
    except (QAFormatError, CorpusError, ValueError, FileNotFoundError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 1
    model.regex = args.regex  # the QA file's answers, whatever the model was trained on
    if args.read is not None:
        if args.read < 1:
            print(f"evaluate: error: --read must be >= 1, got {args.read}", file=sys.stderr)
            return 1
        model.k = args.read
    import torch

    bf16 = autocast_dtype(args.precision, torch.device("cpu")) == "bf16"
    report, records = evaluate_openqa(model, qa, ks, args.batch_size, bf16,
                                      progress=not args.no_progress)
    name = os.path.splitext(os.path.basename(args.qa))[0]
    path = args.predictions or os.path.join(os.path.dirname(os.path.abspath(args.model)),
                                            f"predictions-{name}.jsonl")
    write_predictions(records, path)
    emit_summary({"mode": "openqa", "model": args.model, "retrieval":
                  "dense" if model.dense else "bm25", "corpus": args.corpus, "qa": args.qa,
                  "precision": "bf16" if bf16 else "fp32", **report, "predictions": path,
                  "total_seconds": round(time.perf_counter() - t0, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
