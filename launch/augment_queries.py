"""DRAMA-style training data: a language model writes queries for blocks and labels retrieved ones.

    python launch/augment_queries.py --corpus DIR --output DIR [--limit N] [--llm smollm2] \
        [--candidates 4] [--retriever bm25|RETRIEVER_DIR] [--kinds crop,llm]

For each of --limit random blocks: a random sentence of it (a pseudo-query) and a question that
SmolLM2-135M-Instruct writes for it; for each query the retriever's top --candidates blocks (the
source block among them), scored by the LM's log p(query | block): the best is the positive, the
rest are distractors. Writes DIR/triplets.jsonl and, when complete, DIR/manifest.json; re-running
continues a killed run. `accelerate launch launch/train_retriever.py retriever_training.triplets=DIR`
trains a DPR retriever on it. The last stdout line is a JSON summary (records, queries/s).
"""

import argparse
import sys

from realm.cli import emit_summary, setup_logging


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="corpus directory (prepare_corpus.py)")
    parser.add_argument("--output", required=True, help="triplet directory to write (or finish)")
    parser.add_argument("--limit", type=int, default=None,
                        help="source blocks sampled (default: every block)")
    parser.add_argument("--llm", default="smollm2",
                        help="causal LM: a directory, a hub name, or `smollm2` (packaged)")
    parser.add_argument("--candidates", type=int, default=4, help="blocks labelled per query")
    parser.add_argument("--retriever", default="bm25",
                        help="`bm25`, or a retriever directory / run whose retriever/ searches")
    parser.add_argument("--kinds", default="crop,llm",
                        help="query kinds: `crop` (a random sentence), `llm` (a written question)")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per LM batch")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="longest written question (LM tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    setup_logging()
    from realm.training.augment import augment_queries
    from realm.errors import CorpusError

    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    try:
        summary = augment_queries(
            args.corpus, args.output, llm=args.llm, limit=args.limit,
            candidates=args.candidates, retriever=args.retriever,
            kinds=[k.strip() for k in args.kinds.split(",") if k.strip()], seed=args.seed,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            progress=not args.no_progress)
    except (CorpusError, ValueError, FileNotFoundError, OSError) as err:
        print(f"augment_queries: error: {err}", file=sys.stderr)
        return 1
    emit_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
