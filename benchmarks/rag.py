"""Generative Open-QA (RAG) throughput: training questions/s (fp32 vs bf16), questions/s and EM
of each decoding mode, and the latency of one answer.

    python benchmarks/rag.py [--steps 8] [--warmup 2] [--eval-questions 40]
                             [--retriever bm25|dpr|DIR] [--model RUN/model]
                             [--modes greedy,beam,thorough,fast] [key=value ...]

Sizes (k, generator and its mode, LoRA rank, token limits, beam size, batch sizes, lr, the QA
files and the corpus) come from ``configs/rag_leads.yaml`` (``--config``) unless overridden
(``key=value`` after the flags); the corpus is built into ``cache_dir`` if missing (run from the
repo root). The index is BM25 over the corpus by default (no DPR to train); ``--retriever`` names
another as ``openqa.retriever`` does (``dpr``: the cached DPR retriever, trained first if
missing; a retriever or run directory), its fixed index embedded once into ``cache_dir``.

1. **Training**: the RAG loss step (``openqa.rag_loss``, :class:`realm.training.rag.RAGTask`:
   the generator in ``openqa.generator_mode``, e.g. its LoRA adapter, and the query encoder of a
   dense retriever; forward, backward, clipping at ``train.max_grad_norm``, one fused AdamW step
   with the generator at ``generator_lr_scale``) on the first ``(warmup + steps) *
   train.batch_size`` training questions, first in fp32, then under bf16 autocast with a fresh
   model from the same seed and the same batches. The first ``--warmup`` steps are not timed.
   ``bf16_over_fp32`` = bf16 questions/s / fp32's.
2. **Decoding**: ``evaluate_openqa`` (retrieve, decode, EM/F1) on the first ``--eval-questions``
   dev questions, ``openqa.eval_batch_size`` at a time, for each ``openqa.decoding`` mode
   (RAG-Token ``greedy`` and ``beam``, RAG-Sequence ``thorough`` and ``fast``;
   ``openqa.beam_size`` beams), in bf16 and fp32: questions/s and EM, so a faster mode that
   answers worse shows. The generator reads as a loaded model does (frozen, plain weights):
   ``openqa.generator`` untrained (zero-shot RAG), or with ``--model`` a saved model.
3. **Answer latency**: seconds per question of ``OpenQA.answer`` (retrieve, RAG-Token greedy,
   evidence), one question at a time under bf16 after load, over ``--latency-questions`` dev
   questions after one untimed; issue 39's goal is <= 2 s.

Beside the figures: the sizes read, the threads, whether the CPU has native bf16, and the
1-minute load average before and after (co-tenant jobs on the cores slow every measurement). One
JSON object on stdout; progress on stderr.
"""

import argparse
import copy
import dataclasses
import gc
import json
import logging
import os
import sys
import time
from types import SimpleNamespace

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
for _key, _value in OFFLINE.items():  # before transformers is imported: it reads them then
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from realm.config import load_config  # noqa: E402
from realm.data.qa import read_qa  # noqa: E402
from realm.data.store import BlockStore  # noqa: E402
from realm.evaluate.openqa import evaluate_openqa  # noqa: E402
from realm.modeling.rag import METHODS, GenerativeOpenQAModel  # noqa: E402
from realm.precision import autocast, cpu_has_native_bf16  # noqa: E402
from realm.qa import OpenQA  # noqa: E402
from realm.training.openqa_setup import prepare_retrieval  # noqa: E402
from realm.training.prepare import prepare_corpus  # noqa: E402
from realm.training.rag import RAGTask, build_generator  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "rag_leads.yaml")
GOAL_ANSWER_S = 2.0  # issue 39: one answer <= 2 s after load
#: prepare_retrieval's accelerator in this single process (it embeds the index itself)
ONE_PROCESS = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)

logger = logging.getLogger("rag_benchmark")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--retriever", default="bm25", help="bm25 (default), dpr, or a "
                        "retriever / run directory, as openqa.retriever (which it replaces)")
    parser.add_argument("--model", default=None, help="a saved generative model (RUN/model) to "
                        "decode with instead of the untrained generator")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--eval-questions", type=int, default=40)
    parser.add_argument("--latency-questions", type=int, default=10)
    parser.add_argument("--modes", default=",".join(METHODS),
                        help=f"decoding modes, comma-separated (of {', '.join(METHODS)})")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-bf16", action="store_true", help="fp32 only (bf16 is slow on CPUs "
                        "without AVX512-BF16)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in METHODS]
    if bad or not args.modes:
        parser.error(f"--modes: {', '.join(bad) or 'none given'}: not one of {', '.join(METHODS)}")
    if args.steps < 1 or args.warmup < 0 or args.eval_questions < 1 \
            or args.latency_questions < 1:
        parser.error("--steps, --eval-questions and --latency-questions must be >= 1, "
                     "--warmup >= 0")
    return args


def rag_model(config, generator, retriever, index, store) -> GenerativeOpenQAModel:
    """The stage's model (:func:`realm.training.rag.run_rag`'s settings) over ``generator``."""
    o = config.openqa
    return GenerativeOpenQAModel(
        retriever, generator, index, store, k=o.k, max_question_tokens=o.max_question_tokens,
        rag_loss=o.rag_loss, decoding=o.decoding, beam_size=o.beam_size,
        max_answer_tokens=o.max_answer_tokens, max_train_answers=o.max_train_answers,
        train_query_encoder=o.train_query_encoder,
        retrieval_temperature=o.retrieval_temperature)


def time_training(config, retriever, index, store, batches: list, bf16: bool,
                  warmup: int) -> dict:
    """Questions/s of the RAG loss step of a fresh model (the same seed) over ``batches``."""
    o, t = config.openqa, config.train
    model = rag_model(config, build_generator(config, bf16), copy.deepcopy(retriever), index,
                      store).train()
    task = RAGTask([], [], lambda m: m, o.recall_ks, o.eval_batch_size, bf16)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise SystemExit(f"openqa.generator_mode={o.generator_mode} with retriever "
                         f"{o.retriever}: nothing trains (use lora or full)")
    groups = [{"params": [p for n, p in named if n.startswith("generator.") == is_gen],
               "lr": t.lr * (o.generator_lr_scale if is_gen else 1.0)} for is_gen in (True, False)]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr,
                                  weight_decay=t.weight_decay, fused=True)
    times, losses = [], []
    name = "bf16" if bf16 else "fp32"
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        with autocast(bf16, model.generator.device):
            loss, _ = task.loss(model, task.collate(list(enumerate(batch))))
        loss.backward()
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s, loss = time.perf_counter() - t0, float(loss.detach())
        logger.info("train %s step %d%s: %.2f s, loss %.3f", name, i + 1,
                    " (warm-up)" if i < warmup else "", step_s, loss)
        if i >= warmup:
            times.append(step_s)
            losses.append(loss)
    n = sum(len(b) for b in batches[warmup:])
    out = {"questions_per_s": round(n / sum(times), 3),
           "step_s": round(sum(times) / len(times), 3),
           "mean_loss": round(sum(losses) / len(losses), 4),
           "trainable_params": sum(p.numel() for p in params)}
    del model, optimizer
    gc.collect()
    return out


def time_decoding(model: GenerativeOpenQAModel, dev: list, modes: list, precisions: list,
                  recall_ks, batch_size: int) -> dict:
    """Questions/s, EM and F1 of each decoding mode in each precision."""
    decoding, out = model.decoding, {}
    for mode in modes:
        model.decoding = mode
        runs = {}
        for name, bf16 in precisions:
            report, _ = evaluate_openqa(model, dev, recall_ks, batch_size, bf16, progress=False)
            runs[name] = {k: report[k] for k in ("questions_per_s", "seconds", "questions",
                                                 "exact_match", "f1")}
            logger.info("decode %s %s: %.3f questions/s, EM %.3f", mode, name,
                        report["questions_per_s"], report["exact_match"])
        if len(runs) == 2:
            runs["bf16_over_fp32"] = round(runs["bf16"]["questions_per_s"]
                                           / runs["fp32"]["questions_per_s"], 3)
        out[mode] = runs
    model.decoding = decoding
    return out


def time_answers(model: GenerativeOpenQAModel, questions: list, bf16: bool) -> dict:
    """Seconds of ``OpenQA.answer`` per question, one at a time (greedy), the first untimed."""
    decoding, model.decoding = model.decoding, "greedy"
    qa = OpenQA(model, "")
    seconds = []
    with autocast(bf16, model.generator.device):
        for q in questions:
            t0 = time.perf_counter()
            qa.answer(q)
            seconds.append(time.perf_counter() - t0)
    model.decoding = decoding
    timed = seconds[1:] or seconds
    mean = sum(timed) / len(timed)
    return {"precision": "bf16" if bf16 else "fp32", "questions": len(timed),
            "first_s": round(seconds[0], 4), "s_per_question": round(mean, 4),
            "max_s": round(max(timed), 4), "goal_s": GOAL_ANSWER_S,
            "meets_goal": mean <= GOAL_ANSWER_S}


def decoding_model(args, config, retriever, index, store) -> GenerativeOpenQAModel:
    """The model that decodes: a saved one (``--model``), or the untrained generator frozen
    (plain weights, as a loaded model reads). fp32 weights and no autocast of its own: each
    measurement sets its precision."""
    if args.model:
        return OpenQA.from_pretrained(args.model, precision="fp32").model
    frozen = dataclasses.replace(config, openqa=dataclasses.replace(config.openqa,
                                                                    generator_mode="frozen"))
    return rag_model(frozen, build_generator(frozen, False), retriever, index, store).eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    config = dataclasses.replace(config, openqa=dataclasses.replace(
        config.openqa, retriever=args.retriever, closed_book=False))
    o, bs = config.openqa, config.train.batch_size
    train_qa = read_qa(o.train_qa, limit=(args.steps + args.warmup) * bs)
    dev = read_qa(o.dev_qa, limit=max(args.eval_questions, args.latency_questions + 1))
    if len(train_qa) < (args.steps + args.warmup) * bs:
        raise SystemExit(f"{o.train_qa}: {len(train_qa)} questions, fewer than (steps + warmup) "
                         f"x train.batch_size = {(args.steps + args.warmup) * bs}")
    corpus = prepare_corpus(config, progress=False)
    store = BlockStore(corpus)
    retriever, index, retriever_dir = prepare_retrieval(config, corpus, store, ONE_PROCESS,
                                                        progress=False)
    load_before = os.getloadavg()[0]
    precisions = [("fp32", False)] + ([] if args.no_bf16 else [("bf16", True)])
    batches = [train_qa[s * bs:(s + 1) * bs] for s in range(args.steps + args.warmup)]
    train = {name: time_training(config, retriever, index, store, batches, bf16, args.warmup)
             for name, bf16 in precisions}
    if not args.no_bf16:
        train["bf16_over_fp32"] = round(train["bf16"]["questions_per_s"]
                                        / train["fp32"]["questions_per_s"], 3)
    model = decoding_model(args, config, retriever, index, store)
    decoding = time_decoding(model, dev[:args.eval_questions], args.modes, precisions,
                             o.recall_ks, o.eval_batch_size)
    latency = time_answers(model, [ex.question for ex in dev[:args.latency_questions + 1]],
                           not args.no_bf16)
    result = {
        "benchmark": "rag", "config": os.path.relpath(args.config, REPO),
        "overrides": args.overrides, "retriever": args.retriever,
        "retriever_dir": retriever_dir, "model": args.model, "blocks": len(store),
        "generator": o.generator, "generator_mode": o.generator_mode,
        "lora_rank": o.generator_lora_rank if o.generator_mode == "lora" else None,
        "rag_loss": o.rag_loss, "k": o.k, "beam_size": o.beam_size,
        "max_generator_tokens": o.max_generator_tokens,
        "max_answer_tokens": o.max_answer_tokens, "batch_size": bs,
        "eval_batch_size": o.eval_batch_size, "threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_has_native_bf16(), "torch": torch.__version__,
        "steps_timed": args.steps, "warmup": args.warmup,
        "train": train, "decoding": decoding, "answer_latency": latency,
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
