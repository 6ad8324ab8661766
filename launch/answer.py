"""Ask a fine-tuned Open-QA model (launch/finetune_openqa.py's model/ directory) questions.

    python launch/answer.py --model runs/openqa-squad/model "who wrote hamlet"
    python launch/answer.py --model runs/rag-leads/model "who painted the mona lisa"
    python launch/answer.py --model RUN/model --qa questions.jsonl --output answers.jsonl

Either kind of model: a span reader (the answer is cut from a block) or a RAG generator (the
answer is written after the blocks). Prints, for each question, the answer, its probability and
the blocks it read: retrieval score, p(block | question, answer) and title (`*` where the block
holds the answer); with --qa, writes one JSON record per question to --output. The last stdout
line is a JSON summary. The corpus is the one the model's manifest names (--corpus to point
elsewhere; a different corpus is refused).
"""

import argparse
import logging
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the fine-tuned model/ directory")
    parser.add_argument("questions", nargs="*", help="questions to answer")
    parser.add_argument("--qa", help="a jsonl file of {question, ...} records to answer")
    parser.add_argument("--output", help="where --qa's answers go (jsonl)")
    parser.add_argument("--corpus", help="the corpus directory, if not where the model says")
    parser.add_argument("--k", type=int, help="blocks read per question (default: the model's)")
    parser.add_argument("--min-probability", type=float, metavar="P",
                        help="no answer when the answer's probability is below P (e.g. 0.3)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="a generator's precision: bf16 where the CPU runs it fast (auto)")
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
    args = parser.parse_args(argv)
    if not args.questions and not args.qa:
        parser.error("give questions, or --qa FILE")
    if args.qa and not args.output:
        parser.error("--qa needs --output FILE.jsonl")
    from realm.fsutil import output_problem

    problem = output_problem(args.output) if args.output else None
    if problem:  # before loading the model and answering
        parser.error(f"--output {args.output}: {problem}")
    from realm.cli import emit_summary, setup_logging

    setup_logging("WARNING")
    logging.getLogger("realm.qa").setLevel(logging.WARNING)
    try:
        from realm.qa import OpenQA, read_questions
        from realm.evaluate.openqa import write_predictions

        t0 = time.perf_counter()
        qa = OpenQA.from_pretrained(args.model, corpus=args.corpus, precision=args.precision)
        questions = list(args.questions)
        if args.qa:
            questions += read_questions(args.qa)
        import math

        floor = None if args.min_probability is None else math.log(max(args.min_probability, 1e-300))
        results = qa.answer_batch(questions, k=args.k, min_score=floor)
    except (ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    for r in results[: len(args.questions)]:
        answer = "(no answer: below --min-probability)" if r.get("no_answer") else r["answer"]
        print(f"Q: {r['question']}\nA: {answer}  (p = {r['probability']:.3f})")
        for e in r["evidence"]:
            print(f"   {e['score']:8.3f}  p={e['probability']:.2f}  {e['title']}"
                  f"{'  *' if e['answer_here'] else ''}")
    if args.qa:
        try:
            write_predictions(results[len(args.questions):], args.output)
        except OSError as err:  # a full disk: one line, the earlier file kept
            if args.debug:
                raise
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 1
    seconds = time.perf_counter() - t0
    emit_summary({"stage": "answer", "model": qa.directory, "questions": len(results),
                  "output": args.output, "seconds": round(seconds, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
