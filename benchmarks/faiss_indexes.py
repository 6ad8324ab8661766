"""faiss exact vs HNSW vs IVF vs IVF-PQ on real block embeddings: build time, queries/s, recall@k.

    python benchmarks/faiss_indexes.py --corpus DIR --retriever DIR_OR_NAME \
        [--max-blocks 100000] [--max-block-tokens 128] [--precision auto] \
        [--cache runs/bench/emb.npy] [--threads 1]

Block embeddings come from the retriever's document encoder (cached as float16 ``.npy``, the
format index generations store; ``--precision auto`` embeds under bf16 autocast where the CPU
runs it fast, as the refresher does). Queries are held-out block embeddings perturbed with noise
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
from realm.modeling.embed import embed_blocks, special_ids
from realm.index.mips import MipsIndex, exact_recall
from realm.precision import autocast_dtype
from realm.modeling.retriever import load_retriever

FACTORIES = ["Flat", "HNSW32", "IVF1024,Flat", "IVF1024,PQ32"]


def block_embeddings(args) -> tuple[np.ndarray, dict]:
    """``(embeddings [n, dim] float16, how they were made)``; the cache keeps both."""
    if args.cache and os.path.exists(args.cache):
        info = {}
        if os.path.exists(args.cache + ".json"):
            with open(args.cache + ".json") as f:
                info = json.load(f)
        return np.load(args.cache), {**info, "cached": True}
    store = BlockStore(args.corpus)
    retriever = load_retriever(args.retriever, args.dim, "mean")
    bf16 = autocast_dtype(args.precision, torch.device("cpu")) == "bf16"
    n = min(args.max_blocks, len(store))
    emb, stats = embed_blocks(retriever, store, special_ids(retriever.tokenizer), np.arange(n),
                              args.max_block_tokens, bf16=bf16, progress=True)
    logging.info("embedded %d blocks at %.1f blocks/s", n, stats["blocks_per_s"])
    emb = emb.astype(np.float16)
    info = {"corpus": args.corpus, "retriever": args.retriever, "corpus_blocks": len(store),
            "embedded_blocks": n, "max_block_tokens": args.max_block_tokens,
            "precision": "bf16" if bf16 else "fp32", "torch_threads": torch.get_num_threads(),
            "embed_s": round(stats["seconds"], 1), "blocks_per_s": round(stats["blocks_per_s"], 1)}
    if args.cache:
        os.makedirs(os.path.dirname(os.path.abspath(args.cache)), exist_ok=True)
        np.save(args.cache + ".tmp.npy", emb)
        os.replace(args.cache + ".tmp.npy", args.cache)
        with open(args.cache + ".json", "w") as f:
            json.dump(info, f)
    return emb, {**info, "cached": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--retriever", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--max-blocks", type=int, default=100_000)
    parser.add_argument("--max-block-tokens", type=int, default=128)
    parser.add_argument("--cache", help="float16 .npy of the embeddings (written, then reused)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="embedding precision (auto: bf16 where the CPU runs it fast)")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists visited per query")
    parser.add_argument("--ef-search", type=int, default=128, help="HNSW search breadth")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--factories", default=";".join(FACTORIES),
                        help="faiss factory strings separated by ';' (they contain commas); "
                             "the first is the exact reference")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    emb, embedding = block_embeddings(args)
    rng = np.random.default_rng(0)
    held = rng.choice(len(emb), size=args.queries, replace=False)
    base_rows = np.setdiff1d(np.arange(len(emb)), held)
    base = emb[base_rows]
    queries = emb[held].astype(np.float32)
    queries += rng.normal(0, queries.std() * 0.1, queries.shape).astype(np.float32)
    results, exact_ids = [], None
    for factory in args.factories.split(";"):
        t0 = time.perf_counter()
        index = MipsIndex.build(base, factory, block_ids=base_rows, nprobe=args.nprobe,
                                ef_search=args.ef_search, gpu=False)
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
    print(json.dumps({"benchmark": "faiss_indexes", "blocks": len(base), "dim": int(emb.shape[1]),
                      "queries": len(queries), "k": args.k, "nprobe": args.nprobe,
                      "ef_search": args.ef_search,
                      "faiss_threads": args.threads or os.cpu_count(), "embedding": embedding,
                      "indexes": results}))


if __name__ == "__main__":
    main()
