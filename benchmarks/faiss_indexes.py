"""faiss exact vs HNSW vs IVF vs IVF-PQ on real block embeddings: build time, queries/s, recall@k.

    python benchmarks/faiss_indexes.py --corpus DIR --retriever DIR_OR_NAME \
        [--max-blocks 100000] [--max-block-tokens 128] [--cache runs/bench/emb.npy]

Block embeddings come from the retriever's document encoder (cached as float16 ``.npy``, the
format index generations store). Queries are held-out block embeddings perturbed with noise
(the index does not contain them), so every index answers the same questions; recall@k is the
fraction of the exact top-k that each approximate index returns. Prints one JSON object.
"""

import argparse
import json
import logging
import os
import time

import numpy as np
import torch

from realm.data.store import BlockStore
from realm.index.embed import embed_blocks, special_ids
from realm.index.mips import MipsIndex, exact_recall
from realm.training.ict import load_retriever

FACTORIES = ["Flat", "HNSW32", "IVF1024,Flat", "IVF1024,PQ32"]


def block_embeddings(args) -> np.ndarray:
    if args.cache and os.path.exists(args.cache):
        return np.load(args.cache)
    store = BlockStore(args.corpus)
    retriever = load_retriever(args.retriever, args.dim, "mean")
    n = min(args.max_blocks, len(store))
    emb, stats = embed_blocks(retriever, store, special_ids(retriever.tokenizer), np.arange(n),
                              args.max_block_tokens, progress=True)
    logging.info("embedded %d blocks at %.1f blocks/s", n, stats["blocks_per_s"])
    emb = emb.astype(np.float16)
    if args.cache:
        os.makedirs(os.path.dirname(os.path.abspath(args.cache)), exist_ok=True)
        np.save(args.cache + ".tmp.npy", emb)
        os.replace(args.cache + ".tmp.npy", args.cache)
    return emb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--retriever", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--max-blocks", type=int, default=100_000)
    parser.add_argument("--max-block-tokens", type=int, default=128)
    parser.add_argument("--cache", help="float16 .npy of the embeddings (written, then reused)")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--factories", default=",".join(FACTORIES))
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    emb = block_embeddings(args)
    rng = np.random.default_rng(0)
    held = rng.choice(len(emb), size=args.queries, replace=False)
    base_rows = np.setdiff1d(np.arange(len(emb)), held)
    base = emb[base_rows]
    queries = emb[held].astype(np.float32)
    queries += rng.normal(0, queries.std() * 0.1, queries.shape).astype(np.float32)
    results, exact_ids = [], None
    for factory in args.factories.split(","):
        t0 = time.perf_counter()
        index = MipsIndex.build(base, factory, block_ids=base_rows)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = index.search(queries, args.k)
        search_s = time.perf_counter() - t0
        if exact_ids is None:
            exact_ids = res.block_ids  # the first factory is the exact reference
        results.append({"factory": factory, "build_s": round(build_s, 2),
                        "queries_per_s": round(len(queries) / search_s, 1),
                        f"recall@{args.k}_vs_exact": round(exact_recall(res.block_ids, exact_ids), 4),
                        "bytes": len(index.to_bytes())})
        logging.info("%s", results[-1])
    print(json.dumps({"blocks": len(base), "dim": int(emb.shape[1]), "queries": len(queries),
                      "k": args.k, "max_block_tokens": args.max_block_tokens,
                      "faiss_threads": args.threads or os.cpu_count(), "indexes": results}))


if __name__ == "__main__":
    main()
