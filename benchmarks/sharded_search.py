"""The sharded index (``index.sharding=ranks``) against one replicated index, in one run.

    python benchmarks/sharded_search.py                       # 200k x 128, 2 gloo ranks
    python benchmarks/sharded_search.py --blocks 1000000 --ranks 4

One process searches the whole exact (``Flat``) index; then ``--ranks`` processes (gloo, one
thread each) each hold ``1/ranks`` of it and run the pretraining search (gather the queries,
search the shard, gather and merge the top k) for the same query batches. Reported: index bytes
per process, search seconds per batch (median), and whether the sharded results equal the
replicated ones. Random unit vectors stand in for block embeddings. Prints one JSON object.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.multiprocessing as mp

from realm.index.sharded import ShardedSearch, torch_gather
from realm.refresh.rundir import RunStore


def _embeddings(n: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)


def _batches(args, rank: int) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + rank)
    return [rng.standard_normal((args.batch, args.dim)).astype(np.float32)
            for _ in range(args.batches)]


def _time_searches(search, batches, k: int) -> tuple[list[float], list[np.ndarray]]:
    search(batches[0], k)  # warm up
    times, ids = [], []
    for queries in batches:
        t0 = time.perf_counter()
        ids.append(search(queries, k).block_ids)
        times.append(time.perf_counter() - t0)
    return times, ids


def _worker(rank: int, args, run_dir: str, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=args.ranks)
    try:
        generation = RunStore(run_dir).load_generation(0, gpu=False, shard=(rank, args.ranks))
        search = ShardedSearch(lambda: generation, torch_gather(), rank)
        times, ids = _time_searches(search, _batches(args, rank), args.k)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), times=np.array(times),
                 ids=np.stack(ids), bytes=len(generation.index.to_bytes()))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="queries per process per search")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        store = RunStore(run_dir)
        store.commit_generation(_embeddings(args.blocks, args.dim), encoder_step=0,
                                corpus_fingerprint="bench")
        whole = store.load_generation(0, gpu=False)
        replicated = {}
        for rank in range(args.ranks):  # every rank's batches, on the one whole index
            replicated[rank] = _time_searches(whole.search, _batches(args, rank), args.k)
        whole_bytes = len(whole.index.to_bytes())
        del whole
        ctx = mp.get_context("spawn")
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [ctx.Process(target=_worker, args=(r, args, run_dir, init, tmp))
                 for r in range(args.ranks)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            sys.exit(f"a sharded worker failed: exit codes {[p.exitcode for p in procs]}")
        shards = [np.load(os.path.join(tmp, f"rank{r}.npz")) for r in range(args.ranks)]
    equal = all(np.array_equal(shards[r]["ids"], np.stack(replicated[r][1]))
                for r in range(args.ranks))
    one = statistics.median(replicated[0][0])
    sharded = statistics.median(float(t) for t in shards[0]["times"])
    print(json.dumps({
        "benchmark": "sharded_search", "blocks": args.blocks, "dim": args.dim,
        "ranks": args.ranks, "queries_per_rank": args.batch, "k": args.k,
        "batches": args.batches, "threads_per_process": 1, "factory": "Flat",
        "index_bytes_replicated": whole_bytes,
        "index_bytes_per_shard": [int(s["bytes"]) for s in shards],
        "bytes_ratio": round(whole_bytes / max(int(s["bytes"]) for s in shards), 3),
        "search_s_replicated": round(one, 5), "search_s_sharded": round(sharded, 5),
        "search_time_ratio": round(sharded / one, 3),
        "results_equal": bool(equal),
    }))


if __name__ == "__main__":
    main()
