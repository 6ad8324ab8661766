"""A refresh far slower than the collective timeout does not stop training.

Two gloo ranks under ``accelerate launch`` (``Accelerator(cpu=True)`` through
``make_accelerator``) with ``train.collective_timeout_s=4`` train beside the real spawned
refresher, which pauses 16 s before embedding each generation (4x the timeout). Every step runs
collectives (a gradient-like all-reduce, the hook's agreed swap); the hook publishes a snapshot
every 3 steps. The run goes through generation 0 (awaited outside any collective) and swaps in
later generations at agreed steps, and the longest wait inside any collective stays far below
the refresh time. At the end each rank shows that the configured timeout does bite: a
collective that one rank enters 4 s after the other fails.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S, REFRESH_PAUSE_S = 4, 16

TRAINER = textwrap.dedent("""
    import json, os, sys, time
    import torch, torch.distributed as dist
    from realm.config import load_config, override, save_config
    from realm.data.store import BlockStore
    from realm.modeling.retriever import Retriever
    from realm.refresh.hook import RefreshHook
    from realm.training.accelerator import make_accelerator

    run_dir, corpus, retriever_dir, timeout, steps = sys.argv[1:6]
    config = load_config(None, [override("train.run_dir", run_dir), override("corpus", corpus),
                                f"train.collective_timeout_s={timeout}", "train.precision=fp32",
                                "retriever.dim=16", "refresh.every_steps=3", "refresh.poll_s=0.2",
                                "refresh.threads=1", "refresh.heartbeat_timeout_s=0",
                                "refresh.share_cores=false"])
    accelerator, _ = make_accelerator(config.train, 0)
    if accelerator.is_main_process:
        save_config(config, run_dir)
    accelerator.wait_for_everyone()
    store = BlockStore(corpus)
    model = Retriever.from_pretrained(retriever_dir)
    hook = RefreshHook.from_config(config, accelerator, model, lambda m: m,
                                   corpus_fingerprint=store.fingerprint, dim=16, cpu_threads=1)
    waits = []  # seconds spent inside each collective

    def timed(fn):
        def call(*args):
            t0 = time.monotonic()
            out = fn(*args)
            waits.append(time.monotonic() - t0)
            return out
        return call

    hook.agree, hook.barrier = timed(hook.agree), timed(hook.barrier)
    grad = timed(lambda t: dist.all_reduce(t))
    t_start, gens = time.monotonic(), []
    for step in range(1, int(steps) + 1):
        hook.before_step(step)  # (step 1: publish, spawn the refresher, await generation 0)
        if step == 1:
            first_wait = time.monotonic() - t_start
        grad(torch.ones(4))  # the step's gradient all-reduce
        time.sleep(0.25)  # the step's compute
        hook.after_step(step, model)
        spread = hook.metrics(step)["index/generation_spread"]  # (a collective too)
        gens.append([hook.watcher.current.generation, spread])
    # the timeout bites: rank 1 enters a collective 4 s late, and rank 0 gives up (before
    # close: rank 0's close waits for the refresher to exit, outside any collective)
    if accelerator.process_index == 1:
        time.sleep(float(timeout) + 4)
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        bites = None
    except Exception as e:  # gloo: "Timed out waiting ... for recv" / connection closed
        bites = [type(e).__name__, round(time.monotonic() - t0, 1)]
    hook.close(finished=True)
    refresher = [json.loads(l) for l in open(os.path.join(run_dir, "refresher", "metrics.jsonl"))]
    print("RESULT " + json.dumps({"rank": accelerator.process_index, "first_wait_s": first_wait,
                                  "max_collective_wait_s": max(waits), "collectives": len(waits),
                                  "generations": gens, "swaps": hook.watcher.swaps,
                                  "refresh_s": [r.get("refresh/total_s") for r in refresher],
                                  "bites": bites}), flush=True)
    os._exit(0)  # (the process group is broken on purpose: no clean shutdown)
""")


@pytest.mark.slow
def test_a_refresh_slower_than_the_collective_timeout_never_stalls_a_collective(
        leads_corpus, tiny_retriever, tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", "29581", str(script),
              str(tmp_path / "run"), leads_corpus, tiny_retriever, str(TIMEOUT_S), "120"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           # the refresher (the trainers never reach this failpoint) pauses before embedding
           "REALM_FAILPOINT": "embed", "REALM_FAILPOINT_S": str(REFRESH_PAUSE_S)}
    done = subprocess.run(launch, capture_output=True, text=True, timeout=420, env=env)
    results = sorted((json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines()
                      if line.startswith("RESULT ")), key=lambda r: r["rank"])
    assert done.returncode == 0 and len(results) == 2, done.stderr[-4000:]
    for r in results:
        # generation 0 took longer than the timeout, and was awaited outside any collective
        assert r["first_wait_s"] > REFRESH_PAUSE_S > TIMEOUT_S
        # every collective of 120 steps returned well within the timeout
        assert r["collectives"] >= 240 and r["max_collective_wait_s"] < TIMEOUT_S / 2, r
        # later generations, each REFRESH_PAUSE_S+ in the making, swapped in at agreed steps
        assert r["swaps"] >= 2 and all(spread == 0 for _, spread in r["generations"])
        assert all(s > 3 * TIMEOUT_S for s in r["refresh_s"] if s), r["refresh_s"]
    # and the timeout is in force: the rank that waited gave up after it
    assert results[0]["bites"] is not None and results[0]["bites"][1] >= TIMEOUT_S - 0.5, results
    assert results[0]["generations"] == results[1]["generations"]
