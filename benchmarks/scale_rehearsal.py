"""Wikipedia scale, rehearsed on this machine: a generation of N x D written through the real
store, loaded as trainers load it, searched, and swapped under a running loop; then a real
refresh of real Wikipedia blocks, killed at 90% and resumed. Prints one JSON object.

    python benchmarks/scale_rehearsal.py                       # 10,000,000 x 128 (REALM's scale)
    python benchmarks/scale_rehearsal.py --blocks 1000000 --real-articles 300
    python benchmarks/scale_rehearsal.py --real-input enwiki2015_first30k_articles.jsonl.gz \
        --real-articles 30000              # a bigger real refresh, from a local Wikipedia file

1. **Commit.** Synthetic float16 embeddings (a seeded normal, one shard at a time: never the
   whole N x D in memory) are written shard by shard into a generation in progress
   (``realm.index.building``) and committed (``commit_s``).
2. **Load.** In fresh processes, one after the other: the whole generation (``replicated``) and
   each half of it (``index.sharding=ranks``, 2 ranks). Each reports its load time and its peak
   resident memory while loading (``/proc/self/clear_refs`` resets the peak first).
   ``peak_rss_ratio``: that peak over the index the process keeps (N x D x 4 bytes for the exact
   index; what the planner calls index bytes per rank); ``peak_rss_over_generation``: over the
   generation's float16 shards on disk (N x D x 2 bytes).
3. **Search.** ``search_ms_per_512``: one exact top-10 search of 512 random queries over the
   whole index (median of 3).
4. **Swap.** A training-like loop (an MLP forward/backward/optimizer step and a top-8 search of
   8 queries over the index in use) runs blocks of ``2 * --swap-every`` steps that alternate
   between no new generation and a new one every ``--swap-every`` steps (committed by another
   process from hard links to the newest generation's shards, as a refresher on other devices
   would commit it; loaded, checked and indexed by the watcher thread; swapped in by the loop):
   ``swap_median_ratio`` and ``swap_max_ratio`` are the median and max step time with swaps over
   without, in one run.
5. **Real refresh** (``--real-articles``, 0 skips it): the articles of ``--real-input`` (by
   default ``package:wiki-leads``, the 10,033 lead sections the main job reads; any corpus
   input the data readers take) built as blocks (no spans), refreshed once by the real refresher
   (``python -m realm refresh --once``) with a 2-layer MiniLM retriever; then again in a new run
   directory, killed (``kill -9``) after 90% of its shards, and restarted: the resumed refresh's
   time over the full one's. The planner's estimates for the same run sit beside the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from realm.index.building import GenerationBuild  # noqa: E402
from realm.refresh.rundir import RunStore  # noqa: E402

FINGERPRINT = "synthetic"


def commit_synthetic(run_dir: str, n: int, dim: int, shard_blocks: int, step: int) -> float:
    """Commit generation of encoder step ``step``: seeded rows, shard by shard. Returns seconds."""
    store = RunStore(run_dir)
    t0 = time.perf_counter()
    build = GenerationBuild(store, {"encoder_step": step, "snapshot": f"synthetic-{step}",
                                    "n_blocks": n, "dim": dim, "shard_blocks": shard_blocks})
    build.prepare()
    for i, (start, end) in enumerate(build.bounds):
        rng = np.random.default_rng([step, i])
        build.write_shard(i, rng.standard_normal((end - start, dim), dtype=np.float32)
                          .astype(np.float16))
    store.commit_build(build, encoder_step=step, corpus_fingerprint=FINGERPRINT,
                       extra={"encoder_time": time.time()})
    store.gc_generations(keep=2)
    return time.perf_counter() - t0


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def load_child(run_dir: str, part: str, queries: int) -> None:
    """(Child process) load generation 0 whole or one shard; print load time, peak, search."""
    __import__("faiss")  # (its import is not the load's memory)

    store = RunStore(run_dir)
    generation = store.read_latest()["generation"]
    store.read_generation_manifest(generation)
    shard = None if part == "whole" else tuple(map(int, part.split("/")))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the resident size now
    before = _status("VmRSS")
    t0 = time.perf_counter()
    gen = store.load_generation(generation, gpu=False, shard=shard)
    load_s = time.perf_counter() - t0
    peak = _status("VmHWM") - before
    index = gen.index.ntotal * gen.index.dim * 4
    out = {"part": part, "rows": gen.rows, "load_s": round(load_s, 3), "peak_rss_bytes": peak,
           "index_bytes": index, "generation_bytes": gen.index.ntotal * gen.index.dim * 2,
           "peak_rss_ratio": round(peak / index, 3),
           "peak_rss_over_generation": round(peak / (index / 2), 3)}
    if queries:
        q = np.random.default_rng(1).standard_normal((queries, gen.index.dim), dtype=np.float32)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            gen.search(q, 10)
            times.append(time.perf_counter() - t0)
        out["search_ms_per_512"] = round(statistics.median(times) * 1000 * 512 / queries, 1)
    print(json.dumps(out), flush=True)


def committer_child(run_dir: str, n: int, dim: int, shard_blocks: int) -> None:
    """(Child process) commit a new generation for each line read; answer "done". The stand-in
    for a refresher on other devices: its shards are hard links to the newest generation's (the
    loop's machine pays for loading generations, not for making them)."""
    store = RunStore(run_dir)
    print("ready", flush=True)
    for step, _ in enumerate(sys.stdin, start=1):
        latest = store.read_latest()
        where = store.path("index", latest["path"])
        manifest = store.read_generation_manifest(int(latest["generation"]))
        build = GenerationBuild(store, {"encoder_step": step, "snapshot": f"linked-{step}",
                                        "n_blocks": n, "dim": dim, "shard_blocks": shard_blocks})
        build.prepare()
        for i, shard in enumerate(manifest["shards"]):
            os.link(f"{where}/{shard['file']}", build.path_of(shard["file"]))
            store.write_json_atomic(build.marker(i), {**shard, **manifest["files"][shard["file"]]})
        store.commit_build(build, encoder_step=step, corpus_fingerprint=FINGERPRINT,
                           extra={"encoder_time": time.time()})
        store.gc_generations(keep=2)
        print("done", flush=True)


def _child(args: list[str], threads: int) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        raise RuntimeError(f"{args}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def swap_loop(args, run_dir: str) -> dict:
    """Step times of a training-like loop without and with swaps, interleaved in one run."""
    import torch

    from realm.refresh.watcher import IndexWatcher

    torch.set_num_threads(args.threads)
    watcher = IndexWatcher(RunStore(run_dir), corpus_fingerprint=FINGERPRINT, dim=args.dim,
                           poll_s=0.2, gpu=False).start()
    watcher.wait_for_first(timeout=600)
    model = torch.nn.Sequential(torch.nn.Linear(args.dim, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, args.dim))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(64, args.dim)
    proc = subprocess.Popen([sys.executable, __file__, "--committer", run_dir, str(args.blocks),
                             str(args.dim), str(args.shard_blocks)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    block = 2 * args.swap_every
    phases = ["none" if (s // block) % 2 == 0 else "swaps"
              for s in range(args.warmup + 2 * args.swap_steps)]
    times, swaps = [], 0
    for step, phase in enumerate(phases):
        if phase == "swaps" and step % args.swap_every == 0:
            proc.stdin.write("commit\n")
            proc.stdin.flush()
        t0 = time.perf_counter()
        swaps += watcher.maybe_swap()
        q = model(x)  # [64, dim]
        found = watcher.search(q[:8].detach().numpy(), 8)
        loss = (q ** 2).mean() + 0 * float(found.scores[0, 0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
    proc.stdin.close()
    proc.wait()
    watcher.stop()
    timed = list(zip(times, phases))[args.warmup:]
    base = [t for t, p in timed if p == "none"]
    with_swaps = [t for t, p in timed if p == "swaps"]
    return {"steps_each": len(base), "swaps": swaps, "swap_every": args.swap_every,
            "median_step_s_no_swaps": round(statistics.median(base), 4),
            "median_step_s_swaps": round(statistics.median(with_swaps), 4),
            "max_step_s_no_swaps": round(max(base), 4),
            "max_step_s_swaps": round(max(with_swaps), 4),
            "swap_median_ratio": round(statistics.median(with_swaps) / statistics.median(base), 3),
            "swap_max_ratio": round(max(with_swaps) / max(base), 3),
            "last_load_s": round(watcher.last_load_s, 3)}


def _refresh_cmd(run_dir: str, corpus: str, args) -> list[str]:
    return [sys.executable, "-m", "realm", "refresh", "--run-dir", run_dir, "--corpus", corpus,
            "--once", "--no-progress", f"refresh.threads={args.real_threads}",
            "refresh.heartbeat_timeout_s=0", f"index.shard_blocks={args.real_shard_blocks}",
            "retriever.dim=128", f"retriever.max_block_tokens={args.real_max_block_tokens}"]


def real_refresh(args, workdir: str) -> dict:
    """Build the first ``--real-articles`` of ``--real-input`` (all of it when not given), refresh
    it once, then kill a second refresh after 90% of its shards and time the resumed one."""
    from realm.config import DataConfig, SpansConfig, load_config, override
    from realm.data.build import build_corpus
    from realm.data.store import BlockStore
    from realm.hub import truncated_encoder
    from realm.index.plan import plan
    from realm.modeling.retriever import Retriever

    corpus = os.path.join(workdir, "real-corpus")
    t0 = time.perf_counter()
    build_corpus(DataConfig(input=args.real_input, max_articles=args.real_articles,
                            max_block_tokens=args.real_max_block_tokens),
                 SpansConfig(enabled=False), corpus, progress=False)
    build_s = time.perf_counter() - t0
    n = len(BlockStore(corpus))
    args.real_shard_blocks = args.real_shard_blocks or max(1, math.ceil(n / 20))
    encoder = truncated_encoder("sentence-transformers/all-MiniLM-L6-v2", 2,
                                os.path.join(workdir, "cache"))
    retriever = Retriever.from_checkpoint(encoder, dim=128, pooling="mean")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.real_threads), "HF_HUB_OFFLINE": "1"}
    out: dict = {"input": args.real_input, "articles": args.real_articles, "blocks": n,
                 "build_s": round(build_s, 1), "shard_blocks": args.real_shard_blocks,
                 "threads": args.real_threads}

    full = os.path.join(workdir, "real-full")
    RunStore(full).publish_encoder(retriever, step=0)
    t0 = time.perf_counter()
    done = subprocess.run(_refresh_cmd(full, corpus, args), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    wall = time.perf_counter() - t0
    m = RunStore(full).read_generation_manifest(0)
    out["full"] = {"wall_s": round(wall, 1), "total_s": json.loads(done.stdout.splitlines()[-1])
                   ["total_s"], "embed_s": m["timings"]["embed_s"],
                   "blocks_per_s": m["blocks_per_s"], "precision": m["precision"]}

    killed = os.path.join(workdir, "real-killed")
    RunStore(killed).publish_encoder(retriever, step=0)
    shards = math.ceil(n / args.real_shard_blocks)
    at = max(1, math.floor(0.9 * shards))
    log = open(os.path.join(workdir, "killed.log"), "wb")
    proc = subprocess.Popen(_refresh_cmd(killed, corpus, args), stdout=log,
                            stderr=subprocess.STDOUT, env={**env, "REALM_FAILPOINT": f"shard-{at}",
                                                           "REALM_FAILPOINT_S": "600"})
    while f"failpoint shard-{at} reached" not in open(log.name, errors="replace").read():
        if proc.poll() is not None:
            raise RuntimeError(open(log.name).read()[-3000:])
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.perf_counter()
    done = subprocess.run(_refresh_cmd(killed, corpus, args), capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    wall = time.perf_counter() - t0
    resumed = json.loads(done.stdout.splitlines()[-1])
    m = RunStore(killed).read_generation_manifest(0)
    out["resumed"] = {"killed_after_shards": at, "of_shards": shards, "wall_s": round(wall, 1),
                      "total_s": resumed["total_s"], "shards_resumed": m["shards_resumed"],
                      "blocks_embedded": m["blocks_embedded"],
                      "total_ratio": round(resumed["total_s"] / out["full"]["total_s"], 3),
                      "wall_ratio": round(wall / out["full"]["wall_s"], 3)}
    config = load_config(None, [override("corpus", corpus), override("train.run_dir", full),
                                "pretrain.encoder=sentence-transformers/all-MiniLM-L6-v2",
                                "pretrain.encoder_layers=2", "retriever.dim=128",
                                f"retriever.max_block_tokens={args.real_max_block_tokens}",
                                f"refresh.threads={args.real_threads}"])
    estimate = plan(config, processes=1, device="cpu")
    out["plan"] = {"refresh_s": estimate["refresh"]["seconds"],
                   "index_bytes_per_rank": estimate["index_bytes_per_rank"],
                   "refresh_s_over_measured": round(estimate["refresh"]["seconds"]
                                                    / out["full"]["embed_s"], 3),
                   "generation_bytes": estimate["generation_bytes"],
                   "generation_bytes_on_disk": sum(
                       f["bytes"] for f in RunStore(full).read_generation_manifest(0)["files"]
                       .values())}
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        return load_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    if len(sys.argv) > 1 and sys.argv[1] == "--committer":
        return committer_child(sys.argv[2], *map(int, sys.argv[3:6]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--shard-blocks", type=int, default=131072)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--swap-steps", type=int, default=40, help="timed steps of each phase")
    parser.add_argument("--swap-every", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--real-articles", type=int, default=None,
                        help="articles of --real-input for the real refresh (default: all of "
                             "them; 0: skip the real refresh)")
    parser.add_argument("--real-input", default="package:wiki-leads",
                        help="the real refresh's corpus input: a file, directory, hf:NAME or "
                             "package:wiki-leads (default: the lead sections the main job reads)")
    parser.add_argument("--real-max-block-tokens", type=int, default=128)
    parser.add_argument("--real-threads", type=int, default=1,
                        help="refresher threads of the real refresh (1: what the planner's CPU "
                             "throughput was measured with)")
    parser.add_argument("--real-shard-blocks", type=int, default=0,
                        help="shard size of the real refresh (0: a twentieth of the blocks)")
    parser.add_argument("--workdir", help="keep everything here (default: a temp directory, "
                                          "removed at the end: the default writes 2.6 GB)")
    args = parser.parse_args()
    if args.workdir:
        return rehearse(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="realm-rehearsal-") as workdir:
        rehearse(args, workdir)


def rehearse(args, workdir: str) -> None:
    """Run the five parts in ``workdir`` and print their JSON."""
    import faiss

    faiss.omp_set_num_threads(args.threads)
    run_dir = os.path.join(workdir, "synthetic")
    out: dict = {"benchmark": "scale_rehearsal", "blocks": args.blocks, "dim": args.dim,
                 "shard_blocks": args.shard_blocks, "threads": args.threads,
                 "cpus": len(os.sched_getaffinity(0)), "loadavg_start": os.getloadavg()[0]}
    out["commit_s"] = round(commit_synthetic(run_dir, args.blocks, args.dim, args.shard_blocks,
                                             0), 2)
    out["generation_bytes"] = sum(
        f["bytes"] for f in RunStore(run_dir).read_generation_manifest(0)["files"].values())
    whole = _child(["--load", run_dir, "whole", str(args.queries)], args.threads)
    ranks = [_child(["--load", run_dir, f"{r}/2", "0"], args.threads) for r in range(2)]
    out.update({"load_s": whole["load_s"], "peak_rss_ratio": whole["peak_rss_ratio"],
                "peak_rss_ratio_sharded": max(r["peak_rss_ratio"] for r in ranks),
                "search_ms_per_512": whole["search_ms_per_512"]})
    out["load"] = {"replicated": whole, "sharded_2": ranks}
    from realm.index.mips import index_bytes  # the planner's figure for the same index

    planned = index_bytes("Flat", args.dim, args.blocks)
    out["plan_index_bytes"] = planned
    out["peak_rss_over_plan"] = round(whole["peak_rss_bytes"] / planned, 3)
    swap = swap_loop(args, run_dir)
    out.update({"swap_max_ratio": swap["swap_max_ratio"],
                "swap_median_ratio": swap["swap_median_ratio"], "swaps": swap["swaps"],
                "swap": swap})
    if args.real_articles != 0:
        out["real"] = real_refresh(args, workdir)
    out["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
