"""Open-QA throughput: fine-tuning examples/s (fp32 vs bf16) and evaluation questions/s.

    python benchmarks/openqa.py [--retriever bm25|DIR] [--steps 12] [--eval-questions 160]

Sizes (k, token limits, batch, lr, the reader checkpoint and its layers, the QA files and the
corpus) come from ``configs/openqa_squad.yaml`` unless overridden (``key=value`` after the flags);
the corpus is built into ``cache_dir`` if missing (run from the repo root).

1. **Fine-tuning step**, both phases: ``OpenQAModel`` + ``OpenQATask.loss`` on the training
   questions, one AdamW step after another on the same batches, first in fp32, then under
   ``torch.autocast("cpu", dtype=torch.bfloat16)`` with a fresh model from the same seed
   (``--no-bf16`` skips it). ``positive``: each question beside its positive block's window and
   its negatives; ``top_k``: the top k blocks whole. The first ``--warmup`` steps are not timed.
   ``bf16_over_fp32`` = bf16 examples/s / fp32's.
2. **Evaluation.** ``evaluate_openqa`` (retrieve, read the top k, best span, EM/F1, recall) on the
   first ``--eval-questions`` dev questions, fp32 and bf16: questions/s.
3. **Answer latency**: seconds per question of retrieve + read + best span, one question at a
   time and in batches of 32 (fp32).

The 1-minute load average before and after is recorded: other jobs on the cores slow every step.
Prints one JSON object on stdout; progress goes to stderr.
"""

import argparse
import json
import logging
import os
import sys
import time

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "WANDB_MODE": "disabled"}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from realm.config import load_config  # noqa: E402
from realm.data.qa import read_qa  # noqa: E402
from realm.data.store import BlockStore  # noqa: E402
from realm.hub import run_part  # noqa: E402
from realm.modeling.span_reader import SpanReader  # noqa: E402
from realm.modeling.retriever import Retriever  # noqa: E402
from realm.data.qa import QADataset, collate_qa  # noqa: E402
from realm.evaluate.openqa import evaluate_openqa  # noqa: E402
from realm.modeling.openqa import OpenQAModel  # noqa: E402
from realm.retrieval.fixed import BM25Index, DenseIndex, document_embeddings  # noqa: E402
from realm.training.openqa import OpenQATask  # noqa: E402
from realm.training.positives import find_positives  # noqa: E402
from realm.training.prepare import prepare_corpus
from realm.hub import truncated_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model(config, store, seed: int, retriever_src: str, index):
    o = config.openqa
    torch.manual_seed(seed)
    reader = SpanReader.from_checkpoint(
        truncated_encoder(o.reader, o.reader_layers, config.cache_dir),
        o.max_span_tokens, o.span_hidden, scorer=o.span_scorer, seed=seed)
    retriever = None if retriever_src == "bm25" else Retriever.from_pretrained(retriever_src)
    return OpenQAModel(retriever, reader, index, store, reader.tokenizer, k=o.k,
                       max_question_tokens=o.max_question_tokens,
                       max_joined_tokens=o.max_joined_tokens, normalization=o.normalization,
                       retrieval_temperature=o.retrieval_temperature)


def time_training(config, store, retriever_src, index, batches, bf16: bool, warmup: int,
                  positives=None):
    """Examples/s of the top-k phase, or of the positive-block phase with ``positives``."""
    model = build_model(config, store, config.seed, retriever_src, index)
    model.train()
    task = OpenQATask(None, [], lambda m: m, [1], 16, bf16, positives,
                      len(batches) if positives is not None else 0,
                      config.openqa.positive_window, config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.lr, fused=True)
    times, losses = [], []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = task.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            losses.append(float(loss))
        logging.info("%s step %d: %.2f s", "bf16" if bf16 else "fp32", i,
                     time.perf_counter() - t0)
    n = sum(len(b.questions) for b in batches[warmup:])
    return {"examples_per_s": round(n / sum(times), 3), "step_s": round(sum(times) / len(times), 3),
            "mean_loss": round(sum(losses) / len(losses), 4)}


@torch.no_grad()
def time_answers(model, dev, batch_size: int) -> float:
    """Seconds per question: retrieve, read the top k, pick the best span."""
    model.eval()
    data = QADataset(dev, model.tokenizer, model.max_question_tokens)
    t0 = time.perf_counter()
    for lo in range(0, len(data), batch_size):
        batch = collate_qa([data[i] for i in range(lo, min(lo + batch_size, len(data)))])
        model.best_spans(model(batch, with_loss=False))
    return round((time.perf_counter() - t0) / len(data), 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "openqa_squad.yaml"))
    parser.add_argument("--retriever", default=None, help="bm25 or a retriever / pretraining run "
                        "directory (default: the config's openqa.retriever)")
    parser.add_argument("--steps", type=int, default=12, help="timed fine-tuning steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--eval-questions", type=int, default=160)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-bf16", action="store_true", help="fp32 only (bf16 is slow on CPUs "
                        "without AVX512-BF16)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    o = config.openqa
    corpus = prepare_corpus(config, progress=False)
    store = BlockStore(corpus)
    retriever_src = args.retriever or o.retriever
    if retriever_src == "bm25":
        index = BM25Index(store)
    else:
        retriever_src = run_part(retriever_src, "retriever")
        emb = document_embeddings(Retriever.from_pretrained(retriever_src), store,
                                  config.retriever.max_block_tokens, progress=False)
        index = DenseIndex(emb)
    load_before = os.getloadavg()[0]
    train_qa = read_qa(o.train_qa)
    probe = build_model(config, store, config.seed, retriever_src, index)
    dataset = QADataset(train_qa, probe.tokenizer, o.max_question_tokens)
    bs = config.train.batch_size
    batches = [collate_qa([dataset[i] for i in range(s * bs, (s + 1) * bs)])
               for s in range(args.steps + args.warmup)]
    positives = find_positives(probe, dataset, o.positive_search, o.positive_negatives,
                               progress=False)
    train, precisions = {}, [("fp32", False)] + ([] if args.no_bf16 else [("bf16", True)])
    for phase, pos in (("positive", positives), ("top_k", None)):
        train[phase] = {name: time_training(config, store, retriever_src, index, batches,
                                            use_bf16, args.warmup, pos)
                        for name, use_bf16 in precisions}
        if not args.no_bf16:
            train[phase]["bf16_over_fp32"] = round(
                train[phase]["bf16"]["examples_per_s"] / train[phase]["fp32"]["examples_per_s"], 3)
    train["top_k_over_positive"] = round(train["top_k"]["fp32"]["step_s"]
                                         / train["positive"]["fp32"]["step_s"], 3)
    dev = read_qa(o.dev_qa, limit=args.eval_questions)
    latency = {"batch_1_s_per_question": time_answers(probe, dev[:32], 1),
               "batch_32_s_per_question": time_answers(probe, dev, 32)}
    evals = {}
    for name, use_bf16 in precisions:
        report, _ = evaluate_openqa(probe, dev, o.recall_ks, o.eval_batch_size, use_bf16,
                                    progress=False)
        evals[name] = {"questions_per_s": report["questions_per_s"],
                       "seconds": report["seconds"], "questions": report["questions"]}
    result = {
        "benchmark": "openqa", "config": os.path.relpath(args.config, REPO),
        "overrides": args.overrides, "retriever": retriever_src, "blocks": len(store),
        "k": o.k, "batch_size": bs, "max_joined_tokens": o.max_joined_tokens,
        "reader": o.reader, "reader_layers": o.reader_layers,
        "threads": torch.get_num_threads(), "steps_timed": args.steps,
        "train": train, "evaluate": evals, "answer_latency": latency,
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if not args.no_bf16:
        evals["bf16_over_fp32"] = round(evals["bf16"]["questions_per_s"]
                                        / evals["fp32"]["questions_per_s"], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
