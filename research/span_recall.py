"""Does the retriever return blocks the reader can copy the masked span from?

    python benchmarks/span_recall.py --corpus runs/cache/corpus-KEY --retrievers DIR [DIR ...] \
        [--n 800] [--k 1,4,8,20] [--max-query-tokens 32] [--max-block-tokens 64]

Masked examples as pretraining draws them (``MLMDataset``, salient spans, blocks with a span
only, seed 0, ``--n`` of them at random), searched exactly over the corpus embedded by each
retriever with the example's **own block left out** (as pretraining leaves it out). Per
retriever: span recall@k (a retrieved block holds the masked word pieces as a run, in its title
or body: a block the reader can copy from), same-article recall@k (a block of the example's
article), and hubness (the most queries any one block is in the top 4 of). Also, once: the share
of the first 200 examples whose span occurs in any other block of the corpus (the ceiling).
Prints one JSON object. Runs a pretraining run's ``retriever/`` or an ICT warm start's.
"""

import argparse
import collections
import json
import logging

import numpy as np
import torch

from realm.data.mlm import MLMDataset, collate_mlm, mlm_blocks
from realm.data.store import BlockStore
from realm.evaluation.run import holds_span
from realm.modeling.embed import embed_blocks, special_ids
from realm.modeling.retriever import Retriever
from realm.modeling.inputs import build_query_inputs


def measure(path: str, store: BlockStore, examples: list, ks: list[int], args) -> dict:
    retriever = Retriever.from_pretrained(path)
    retriever.eval()
    special = special_ids(retriever.tokenizer)
    emb, _ = embed_blocks(retriever, store, special, max_block_tokens=args.max_block_tokens,
                          bf16=args.bf16, progress=False)  # [n_blocks, dim]
    reps = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        for start in range(0, len(examples), 128):
            batch = collate_mlm(examples[start:start + 128])
            reps.append(retriever.encode_queries(*build_query_inputs(
                batch.query_ids, *special, max_length=args.max_query_tokens + 2)).q_reps.float())
    scores = torch.cat(reps).numpy() @ emb.T  # [n, n_blocks]
    for row, ex in enumerate(examples):
        scores[row, ex.block_id] = -np.inf  # the own block is never a candidate
    top = np.argsort(-scores, axis=1)[:, :max(ks)]  # [n, K]
    span = np.array([[holds_span(store, int(b), ex.target_ids) for b in row]
                     for ex, row in zip(examples, top)])
    same = np.array([[store.title(int(b)) == store.title(ex.block_id) for b in row]
                     for ex, row in zip(examples, top)])
    counts = collections.Counter(top[:, :4].ravel().tolist())
    return {**{f"span_recall@{k}": round(float(span[:, :k].any(1).mean()), 4) for k in ks},
            **{f"same_article@{k}": round(float(same[:, :k].any(1).mean()), 4) for k in ks},
            "hub_top4": max(counts.values())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="corpus directory (queries and blocks)")
    parser.add_argument("--retrievers", nargs="+", required=True, help="retriever directories")
    parser.add_argument("--n", type=int, default=800, help="masked examples")
    parser.add_argument("--k", default="1,4,8,20", help="comma-separated cut-offs")
    parser.add_argument("--max-query-tokens", type=int, default=32)
    parser.add_argument("--max-block-tokens", type=int, default=64)
    parser.add_argument("--fp32", dest="bf16", action="store_false", help="no bf16 autocast")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    ks = sorted(int(k) for k in args.k.split(","))
    store = BlockStore(args.corpus)
    mask_id = Retriever.from_pretrained(args.retrievers[0]).tokenizer.mask_token_id
    data = MLMDataset(store, mask_id, mlm_blocks(store, with_spans=True),
                      max_query_tokens=args.max_query_tokens, seed=0)
    pick = np.random.default_rng(0).permutation(len(data))[:args.n]
    examples = [data[int(i)] for i in pick]
    ceiling = np.mean([any(holds_span(store, b, ex.target_ids) for b in range(len(store))
                           if b != ex.block_id) for ex in examples[:200]])
    out = {"corpus": args.corpus, "examples": len(examples),
           "span_anywhere": round(float(ceiling), 4),
           "retrievers": {path: measure(path, store, examples, ks, args)
                          for path in args.retrievers}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
