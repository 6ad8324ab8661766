"""Evaluate Open-QA models and retrieval over a corpus directory.

    python launch/evaluate.py openqa --model RUN/model --corpus DIR --qa FILE [--regex]
    python launch/evaluate.py retrieval --retriever DIR --corpus DIR --qa FILE --k 1,5,20,100
    python launch/evaluate.py retrieval --bm25 --corpus DIR --qa FILE
    python launch/evaluate.py retrieval --retriever RUN_DIR --compare-with WARM_START_DIR|bm25 \
        --corpus DIR --qa FILE         # paired: questions gained / lost, sign test
    python launch/evaluate.py ict --retriever DIR --corpus DIR [--holdout 500 --seed 0]
    python launch/evaluate.py spans --retriever RUN/retriever --compare-with WARM_START_DIR \
        --corpus DIR --k 4 --max-block-tokens 64 [--examples 500 --seed 0]   # held-out spans
    python launch/evaluate.py compare BEFORE/predictions-dev.jsonl AFTER/predictions-dev.jsonl

Each mode has its own help (`python launch/evaluate.py retrieval --help`). `--retriever` takes a
saved retriever directory, a run directory (pretraining, ICT, DPR: its `retriever/`) or any
transformers checkpoint (fresh projection). `retrieval --run-file FILE` also writes a TREC run
file.
`openqa` reads a fine-tuned model (launch/finetune_openqa.py writes RUN/model) and writes its
predictions (question, prediction, gold, retrieved titles and scores) as jsonl, by default
beside the model. The last stdout line is one JSON object (EM/F1, recall@k, counts, seconds).
`compare` reads two Open-QA predictions files of the same questions and reports each one's EM and
F1 and the questions each answers exactly that the other does not, with the sign test's p-value.
"""

import sys

from realm.evaluate.args import build_parser, parse_args  # argparse only: no torch for --help

__all__ = ["build_parser"]

if __name__ == "__main__":
    parse_args()  # --help and bad flags answer here, before the evaluation imports torch
    from realm.evaluate.cli import main

    sys.exit(main())
