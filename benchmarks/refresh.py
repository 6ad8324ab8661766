"""Refresh benchmarks: swap stall, refresh throughput and end-to-end latency. Prints one JSON object.

    python benchmarks/refresh.py --corpus runs/corpus/leads --retriever runs/ict_minilm/retriever

1. **Swap stall.** A training-like loop on the main thread (query-encoder forward + backward,
   MIPS top-k with exclusion over the index in use, optimizer step) runs blocks of
   ``2 * --swap-every`` steps that alternate between no new generations and a new generation
   every ``--swap-every`` steps (a separate committer process commits it, the watcher thread
   loads it, the loop swaps it in), ``--steps`` steps of each, so that both share whatever else
   the machine does. Reported: median and max step time of both and their ratios, and the time
   of the ``maybe_swap()`` calls that swapped (the part of a step a swap adds).
2. **Refresh throughput and latency.** A refresher process (as the trainer's supervisor spawns
   it) embeds the whole corpus for a freshly published encoder snapshot; latency is snapshot
   published -> generation swapped in by this process's watcher. Throughput (blocks/s from the
   generation's manifest) is compared with a bare document-encoder forward over same-shaped
   random token tensors in this process (``benchmarks/embed_blocks.py``'s baseline), in the
   precision the refresher used (``--precision``: ``auto`` is bf16 where the CPU runs it fast).

For 2 (and the committer of 1) the refresher gets ``--threads`` threads; on a 2-core machine the
loop and the refresher share the CPU, as they would in a CPU-only run.
"""

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embed_blocks import bare_forward  # noqa: E402

from realm.data.store import BlockStore  # noqa: E402
from realm.modeling.embed import special_ids  # noqa: E402
from realm.refresh.rundir import RunStore
from realm.modeling.retriever import Retriever
from realm.modeling.inputs import build_query_inputs
from realm.refresh.watcher import IndexWatcher  # noqa: E402
from realm.modeling.retriever import load_retriever

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def committer(run_dir: str, emb_path: str, fingerprint: str) -> None:
    """(Child process) commit a new generation for every line read from stdin; answer "done"."""
    store = RunStore(run_dir)
    emb = np.load(emb_path)
    print("ready", flush=True)
    for i, _ in enumerate(sys.stdin, start=1):
        store.commit_generation(emb * (1 + 0.01 * i), encoder_step=i,
                                corpus_fingerprint=fingerprint, extra={"encoder_time": time.time()})
        store.gc_generations(keep=2)
        print("done", flush=True)


def training_loop(retriever, watcher, queries, steps, k, batch,
                  before_step=lambda step: None) -> tuple[list, list]:
    """Step times, and the time of each ``maybe_swap()`` that swapped (on this thread)."""
    optimizer = torch.optim.AdamW(retriever.query_encoder.parameters(), lr=1e-5)
    times, swap_times = [], []
    for step in range(steps):
        before_step(step)
        t0 = time.perf_counter()
        if watcher.maybe_swap():
            swap_times.append(time.perf_counter() - t0)
        rows = [queries[(step * batch + j) % len(queries)] for j in range(batch)]
        q = retriever.encode_queries(*rows_to_inputs(rows)).q_reps  # [batch, dim]
        result = watcher.search(q.detach().numpy(), k, exclude=np.arange(batch))
        blocks = torch.from_numpy(watcher.current.embeddings_of(result.block_ids))  # [b, k, dim]
        scores = (q.unsqueeze(1) @ blocks.transpose(1, 2)).squeeze(1)  # [batch, k], with grad
        loss = -torch.logsumexp(scores, dim=-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
    return times, swap_times


def rows_to_inputs(rows):
    return build_query_inputs(rows, *SPECIAL, max_length=34)


def swap_stall(args, retriever, store_blocks: BlockStore, workdir: str) -> dict:
    """Blocks of ``2 * swap_every`` steps alternate between "no swaps" and "swaps" (a commit
    requested every ``swap_every`` steps, loaded by the watcher thread, swapped in by the loop),
    so both conditions share the machine's drift; ``--steps`` steps of each."""
    run_dir = os.path.join(workdir, "swap")
    store = RunStore(run_dir)
    n = len(store_blocks)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, retriever.dim)).astype(np.float16)
    emb_path = os.path.join(workdir, "emb.npy")
    np.save(emb_path, emb)
    store.commit_generation(emb, encoder_step=0, corpus_fingerprint=store_blocks.fingerprint,
                            extra={"encoder_time": time.time()})
    watcher = IndexWatcher(store, corpus_fingerprint=store_blocks.fingerprint, dim=retriever.dim,
                           poll_s=0.2).start()
    watcher.wait_for_first(timeout=60)
    queries = [store_blocks.body_ids(i)[:32] for i in range(0, n, max(1, n // 512))]
    proc = subprocess.Popen([sys.executable, __file__, "--committer", run_dir, emb_path,
                             store_blocks.fingerprint],
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"  # imports done: they would skew the phase
    training_loop(retriever, watcher, queries, args.warmup, args.k, args.batch)  # warm up
    block = 2 * args.swap_every
    blocks = 2 * max(1, args.steps // block)
    phase_of = ["swaps" if (step // block) % 2 else "none" for step in range(blocks * block)]

    def before_step(step: int) -> None:
        if phase_of[step] == "swaps" and step % args.swap_every == 0:
            proc.stdin.write("commit\n")  # the committer works beside the loop
            proc.stdin.flush()

    swaps_before = watcher.swaps
    times, swap_times = training_loop(retriever, watcher, queries, len(phase_of), args.k,
                                      args.batch, before_step)
    proc.stdin.close()
    proc.wait()
    swaps = watcher.swaps - swaps_before
    watcher.stop()
    base = [t for t, phase in zip(times, phase_of) if phase == "none"]
    with_swaps = [t for t, phase in zip(times, phase_of) if phase == "swaps"]
    return {
        "steps_each": len(base), "swaps": swaps, "blocks": n, "swap_every_steps": args.swap_every,
        "interleaved_blocks_of_steps": block,
        "median_step_s_no_swaps": round(statistics.median(base), 4),
        "median_step_s_swaps": round(statistics.median(with_swaps), 4),
        "max_step_s_no_swaps": round(max(base), 4), "max_step_s_swaps": round(max(with_swaps), 4),
        "median_ratio": round(statistics.median(with_swaps) / statistics.median(base), 3),
        "max_ratio": round(max(with_swaps) / max(base), 3),
        "swap_call_s_median": round(statistics.median(swap_times), 4) if swap_times else None,
        "swap_call_s_max": round(max(swap_times), 4) if swap_times else None,
        "last_load_s": round(watcher.last_load_s, 3),
        "loop_precision": "fp32",
    }


def refresh_latency(args, retriever_dir: str, store_blocks: BlockStore, workdir: str) -> dict:
    run_dir = os.path.join(workdir, "refresh")
    store = RunStore(run_dir)
    cmd = [sys.executable, os.path.join(REPO, "launch", "refresh_index.py"), "--run-dir", run_dir,
           "--corpus", store_blocks.path, "--no-progress", "refresh.poll_s=0.2",
           f"refresh.threads={args.threads}", "refresh.heartbeat_timeout_s=0",
           f"refresh.precision={args.precision}",
           f"retriever.max_block_tokens={args.max_block_tokens}"]
    log = open(os.path.join(workdir, "refresher.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    watcher = IndexWatcher(store, corpus_fingerprint=store_blocks.fingerprint, dim=None,
                           poll_s=0.2).start()
    # let the refresher start (imports, corpus, lock), as it would long before a snapshot
    lock = os.path.join(run_dir, "index", ".refresher.lock")
    deadline = time.time() + 300
    while not os.path.exists(lock) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if not os.path.exists(lock):
        raise RuntimeError(f"the refresher did not start; see {log.name}")
    time.sleep(1.0)
    retriever = Retriever.from_pretrained(retriever_dir)
    t0 = time.time()
    store.publish_encoder(retriever, step=1)
    gen = watcher.wait_for_first(timeout=3600)
    latency = time.time() - t0
    store.mark_done()
    proc.wait(timeout=120)
    watcher.stop()
    m = gen.manifest
    # the bare forward over the same batch shapes, here, with the same thread count
    torch.set_num_threads(args.threads)
    bare_s = bare_forward(retriever.eval(), store_blocks, np.arange(len(store_blocks)),
                          args.max_block_tokens, 16384, m["precision"] == "bf16")
    return {
        "blocks": m["n_blocks"], "refresh_blocks_per_s": m["blocks_per_s"],
        "bare_forward_blocks_per_s": round(len(store_blocks) / bare_s, 2),
        "throughput_ratio": round(m["blocks_per_s"] / (len(store_blocks) / bare_s), 3),
        "publish_to_in_use_s": round(latency, 2), "timings": m["timings"],
        "precision": m["precision"], "threads": args.threads,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--committer":
        committer(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--retriever", required=True, help="saved retriever directory")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--swap-every", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed steps first (allocator and thread pools settle)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", default="swap,refresh")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="refresher precision (refresh.precision); the bare forward matches it")
    parser.add_argument("--max-block-tokens", type=int, default=288,
                        help="block word pieces embedded (retriever.max_block_tokens)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    store_blocks = BlockStore(args.corpus)
    retriever = load_retriever(args.retriever, 128, "mean")
    global SPECIAL
    SPECIAL = special_ids(retriever.tokenizer)
    out = {"benchmark": "refresh", "corpus": args.corpus, "retriever": args.retriever,
           "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
           "loadavg_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as workdir:
        if "swap" in args.parts:
            out["swap_stall"] = swap_stall(args, retriever, store_blocks, workdir)
        if "refresh" in args.parts:
            out["refresh"] = refresh_latency(args, args.retriever, store_blocks, workdir)
    out["loadavg_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


SPECIAL = None

if __name__ == "__main__":
    main()
