"""Evaluate Open-QA models and retrieval over a corpus directory.

The command line of ``launch/evaluate.py`` (usage there): its parser and the checks of its flags,
which import nothing heavy, so that ``--help`` and usage errors answer without torch; the
evaluations themselves run in :mod:`realm.evaluate.cli`.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Optional, Sequence

from realm.fsutil import output_problem


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per evaluation, each with its own flags and help."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--corpus", required=True, help="corpus directory (searched)")
    common.add_argument("--k", default="1,5,20,100", help="comma-separated cut-offs")
    common.add_argument("--max-block-tokens", type=int, default=None,
                        help="word pieces of a block when embedding it (default: what a saved "
                             "retriever was trained with, read from its manifest or run; else "
                             "288)")
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
                                   "(launch/finetune_openqa.py's RUN/model: a span reader or a "
                                   "RAG generator, which writes its answers by the decoding it "
                                   "was configured with); writes predictions.")
    p.add_argument("--model", required=True, help="the fine-tuned model directory (RUN/model)")
    p.add_argument("--qa", required=True, help="QA jsonl ({question, answers})")
    p.add_argument("--regex", action="store_true", help="answers are regular expressions")
    p.add_argument("--limit", type=int, help="the first N questions only")
    p.add_argument("--predictions", help="predictions jsonl (default MODEL/../predictions-QA.jsonl)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per batch")
    p.add_argument("--read", type=int, default=None,
                   help="blocks the reader reads per question (default: the model's k)")
    p.add_argument("--decoding", choices=["greedy", "beam", "thorough", "fast"],
                   help="a generative model's decoding (default: the one it was trained with)")
    p.add_argument("--beam-size", type=int, default=None,
                   help="a generative model's beams (beam, thorough, fast; default: its own)")

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
                        "RUN) for trec_eval, pyserini or ir_measures, and its qrels beside it "
                        "(FILE with .qrels: each retrieved block judged 1 when it holds an "
                        "answer)")

    p = sub.add_parser("ict", parents=[common, searcher],
                       help="recall@k of held-out ICT sentences",
                       description="Held-out ICT sentences (the ICT run's own split) -> their "
                                   "block among all blocks: recall@k.")
    p.add_argument("--holdout", type=int, default=500, help="ict.holdout_blocks of the run")
    p.add_argument("--seed", type=int, default=0, help="seed of the run")
    p.add_argument("--limit", type=int, help="the first N held-out sentences only")

    p = sub.add_parser("spans", parents=[common, searcher],
                       help="held-out span recall@k of a pretraining run's retriever",
                       description="The held-out masked sentences of a pretraining run "
                                   "(pretrain.span_recall_examples, drawn from the corpus with the "
                                   "run's seed; their blocks never trained on) -> a top-k block, "
                                   "own block excluded, that holds the span: recall@k, and with "
                                   "--compare-with the paired sign test on the same sentences.")
    p.add_argument("--examples", type=int, default=500,
                   help="pretrain.span_recall_examples of the run (at most a fifth of the "
                        "blocks with a span are drawn)")
    p.add_argument("--seed", type=int, default=0, help="seed of the run")
    p.add_argument("--max-query-tokens", type=int, default=32,
                   help="retriever.max_query_tokens of the run")
    p.add_argument("--compare-with", metavar="RETRIEVER_DIR",
                   help="a second retriever (e.g. the run's warm start) on the same sentences")

    p = sub.add_parser("compare", help="two Open-QA predictions files: paired exact match",
                       description="Two predictions-*.jsonl of the same questions (evaluate.py "
                                   "openqa, or a fine-tune's predictions-dev.jsonl): EM and F1 "
                                   "of each, questions gained / lost, exact sign test.")
    p.add_argument("before", help="predictions of the baseline")
    p.add_argument("after", help="predictions of the system compared with it")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None
               ) -> tuple[argparse.ArgumentParser, argparse.Namespace, Optional[list[int]]]:
    """Parse and check the command line (a bad flag exits 2 with the parser's usage error).

    Returns:
        ``(parser, args, ks)``: ``ks`` the sorted ``--k`` cut-offs (None for ``compare``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode == "compare":
        return parser, args, None
    if args.mode != "openqa" and args.bm25 == bool(args.retriever):
        parser.error(f"{args.mode}: give exactly one of --retriever DIR or --bm25")
    if getattr(args, "fuse_bm25", False) and not args.retriever:
        parser.error("--fuse-bm25 goes with --retriever DIR (BM25 is the other ranking)")
    try:
        ks = sorted({int(k) for k in args.k.split(",")})
    except ValueError:
        parser.error(f"--k: expected comma-separated integers, got {args.k!r}")
    if args.max_block_tokens is None and args.mode in ("openqa", "spans"):
        args.max_block_tokens = 288
    if args.max_block_tokens is not None and args.max_block_tokens < 1:
        parser.error(f"--max-block-tokens: at least 1, got {args.max_block_tokens}")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        parser.error(f"--limit: at least 1 question, got {args.limit}")
    for flag in ("retriever", "compare_with"):  # a directory, or a hub id ("org/name")
        path = getattr(args, flag, None)
        if (path and path != "bm25" and not os.path.isdir(path)
                and not re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", path)):
            parser.error(f"--{flag.replace('_', '-')}: {path}: no such directory")
    for flag in ("run_file", "predictions"):  # outputs: checked before any work
        path = getattr(args, flag, None)
        problem = output_problem(path) if path else None
        if problem:
            parser.error(f"--{flag.replace('_', '-')} {path}: {problem}")
    return parser, args, ks
