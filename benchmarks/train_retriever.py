"""DPR training-step throughput: questions/s in fp32 and under bf16 autocast, in one process.

    python benchmarks/train_retriever.py --corpus runs/cache/corpus-KEY \
        [--qa data/openqa_leads/train.jsonl] [--batch-size 8] [--steps 4]

Real questions and blocks: the first questions of ``--qa`` whose BM25 top 100 holds a block with
an answer (the positive, as the stage mines it) and the best-ranked block without one (the hard
negative). Each variant runs ``--steps`` timed steps of the stage's own task (InfoNCE over the
positive, the hard negatives and the batch: ``realm.training.dpr.DPRTask``; forward, backward,
AdamW) after one untimed step, on the same batches. Ratios are questions/s against fp32.
Prints one JSON object.
"""

import argparse
import json
import logging
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="a corpus directory (prepare_corpus.py)")
    parser.add_argument("--qa", default="data/openqa_leads/train.jsonl")
    parser.add_argument("--encoder", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--layers", type=int, default=None, help="first N layers (default all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hard-negatives", type=int, default=1)
    parser.add_argument("--max-block-tokens", type=int, default=288)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--bf16-steps", type=int, default=2,
                        help="timed bf16 steps (slow on CPUs without AVX512-BF16); 0 skips bf16")
    parser.add_argument("--cache-dir", default="runs/cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from accelerate import Accelerator

    from realm.data.qa import read_qa
    from realm.data.store import BlockStore
    from realm.retrieval.search import BM25Searcher
    from realm.modeling.embed import special_ids
    from realm.modeling.retriever import Retriever
    from realm.hub import truncated_encoder
    from realm.training.dpr import DPRTask, PairDataset, mine_pairs

    accelerator = Accelerator(cpu=True)
    store = BlockStore(args.corpus)
    n_batches = max(args.steps, args.bf16_steps) + 1
    want = n_batches * args.batch_size
    questions = read_qa(args.qa, limit=6 * want)
    ranked = BM25Searcher(store).search([q.question for q in questions],
                                        min(100, len(store))).block_ids
    pairs = mine_pairs(store, questions, ranked, args.hard_negatives, progress=False)
    encoder = truncated_encoder(args.encoder, args.layers, args.cache_dir)
    retriever = Retriever.from_checkpoint(encoder, dim=128, pooling="mean")
    dataset = PairDataset(questions, pairs, retriever.tokenizer, max_query_tokens=64)
    if len(dataset) < want:
        raise SystemExit(f"only {len(dataset)} of {len(questions)} questions have a positive; "
                         f"need {want}")
    task = DPRTask(dataset, store, special_ids(retriever.tokenizer), accelerator,
                   max_block_tokens=args.max_block_tokens)
    n = args.batch_size
    batches = [task.collate([dataset[j] for j in range(i * n, (i + 1) * n)])
               for i in range(n_batches)]

    def time_variant(bf16: bool, steps: int) -> float:
        torch.manual_seed(0)
        model = Retriever.from_checkpoint(encoder, dim=128, pooling="mean")
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        elapsed = 0.0
        for i in range(steps + 1):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = task.loss(model, batches[i])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:  # the first step warms up kernels and allocations
                elapsed += time.perf_counter() - t0
        return elapsed

    block_tokens = float(np.mean([int(b["block"].attention_mask.sum()) for b in batches]))
    result = {"encoder": args.encoder, "layers": args.layers, "batch_size": n,
              "hard_negatives": args.hard_negatives, "threads": torch.get_num_threads(),
              "block_tokens_per_batch": block_tokens}
    runs = [("fp32", False, args.steps)]
    if args.bf16_steps:
        runs.append(("bf16", True, args.bf16_steps))
    base = None
    for name, bf16, steps in runs:
        seconds = time_variant(bf16, steps)
        rate = steps * n / seconds
        base = base or rate
        result[name] = {"questions_per_s": round(rate, 2), "s_per_step": round(seconds / steps, 3),
                        "ratio": round(rate / base, 3)}
    result["bf16_mkldnn_fast"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
