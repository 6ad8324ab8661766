"""DRAMA-style augmentation throughput with SmolLM2: questions written per second and LLM
relevance labels per second, batched against one passage at a time, in one process.

    python benchmarks/augment_queries.py --corpus runs/cache/corpus-KEY [--llm smollm2] \
        [--passages 8] [--candidates 8] [--batch-size 8]

Real blocks: the first ``--passages`` blocks of the corpus. ``write`` times
``LanguageModel.write_questions`` (greedy, the stage's prompt) over them; ``label`` times
``LanguageModel.query_log_probs`` (log p(query | block), how the stage labels candidates) of one
question against ``--candidates`` blocks. Each runs with ``--batch-size`` sequences per forward
pass and with 1 (the baseline of the ratios); one untimed warm-up call first. Prints one JSON
object.
"""

import argparse
import json
import logging
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="a corpus directory (prepare_corpus.py)")
    parser.add_argument("--llm", default="smollm2",
                        help="causal LM (a directory, hub name, or the packaged `smollm2`)")
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from realm.training.augment import LanguageModel
    from realm.data.store import BlockStore

    store = BlockStore(args.corpus)
    llm = LanguageModel(args.llm, batch_size=args.batch_size)
    passages = [(store.title(i), store.text(i)) for i in range(args.passages)]
    candidates = [(store.title(i), store.text(i)) for i in range(args.candidates)]
    llm.write_questions(passages[:1], max_new_tokens=4)  # warm-up
    result = {"llm": args.llm, "threads": torch.get_num_threads(), "passages": args.passages,
              "candidates": args.candidates, "max_new_tokens": args.max_new_tokens}
    question = None
    for name, batch in (("one_at_a_time", 1), ("batched", args.batch_size)):
        llm.batch_size = batch
        t0 = time.perf_counter()
        written = llm.write_questions(passages, max_new_tokens=args.max_new_tokens)
        write_s = time.perf_counter() - t0
        question = question or next((q for q in written if q), "what is this passage about?")
        t0 = time.perf_counter()
        llm.query_log_probs(question, candidates)
        label_s = time.perf_counter() - t0
        result[name] = {"batch_size": batch,
                        "questions_per_s": round(len(passages) / write_s, 3),
                        "labels_per_s": round(len(candidates) / label_s, 3),
                        "questions_written": sum(q is not None for q in written)}
    for key in ("questions_per_s", "labels_per_s"):
        result[f"{key}_ratio_batched"] = round(
            result["batched"][key] / result["one_at_a_time"][key], 3)
    result["example_question"] = question
    print(json.dumps(result))


if __name__ == "__main__":
    main()
