"""The refresh-cost curve: retrieval utility and recall against compute, for refresh every N
steps x re-ranking L candidates. Prints one JSON object (one row per cell).

    python benchmarks/refresh_cost.py [--steps 200] [--every 25,100,never] [--rerank 4,16,64] \
        [--out runs/refresh-cost] [--qa data/openqa_leads/dev.jsonl] [key=value ...]

Every cell is the masked-LM main job (``configs/realm_mlm.yaml``, the default until stop 46:
its corpus, ICT warm start, MLM-adapted reader and generation 0 come from the shared
``cache_dir``, so only the first cell prepares them) run for ``--steps`` steps with
``refresh.every_steps`` = N (``never``: generation 0 for the whole run) and
``pretrain.rerank_candidates`` = L (L = ``pretrain.k``: no re-ranking).
Extra ``key=value`` overrides go to every cell. Cells run one after another in fresh processes.

Per cell:
- ``trainer_s``: the run's seconds less its preparation (the training loop, the refresh hook's
  start and the final saves); ``refresher_s``: the refresher's embedding time summed over the
  generations this run made (generation 0 is the shared warm start's and is left out);
  ``total_s`` their sum. On a 2-core machine the two share the cores.
- ``ru_first_quarter`` / ``ru_last_quarter`` / ``masked_accuracy_last_quarter`` (and its null)
  from the run's summary line; ``rerank_changed_mean``: the mean share of the stale top k that
  re-ranking replaced.
- ``recall@k``: answer recall of the final retriever on ``--qa`` over the run's corpus
  (``launch/evaluate.py retrieval``; DPR's answer matching). The main job's corpus is 1,000 lead
  sections, so many Leads-Open questions have no answer in it: compare cells with each other.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QA = os.path.join(REPO, "data", "openqa_leads", "dev.jsonl")  # python -m realm data leads-open --output data
NEVER = 10 ** 9


def last_json(text: str) -> dict:
    """The last line of ``text`` that is a JSON object."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON summary line in:\n{text[-2000:]}")


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_cell(every: int, rerank: int, args, overrides: list[str]) -> dict:
    name = f"every-{'never' if every == NEVER else every}_L-{rerank}"
    run_dir = os.path.join(args.out, name)
    cmd = [sys.executable, os.path.join(REPO, "launch", "pretrain.py"), "--no-progress",
           "--config", os.path.join(REPO, "configs", "realm_mlm.yaml"),
           f"train.run_dir={run_dir}", f"train.steps={args.steps}",
           f"refresh.every_steps={every}", f"pretrain.rerank_candidates={rerank}",
           "logging.wandb=false", "train.save_every=0", *overrides]
    print(f"[{name}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.time()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    summary = last_json(done.stdout)
    refresher = [r for r in read_jsonl(os.path.join(run_dir, "refresher", "metrics.jsonl"))
                 if r.get("refresh/generation", 0) > 0]
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    changed = [r["rerank_changed"] for r in records if "rerank_changed" in r]
    trainer_s = summary["seconds"] - summary["prepare_s"]
    refresher_s = sum(r["refresh/total_s"] for r in refresher)
    cell = {
        "cell": name, "every_steps": None if every == NEVER else every, "rerank_candidates": rerank,
        "trainer_s": round(trainer_s, 1), "refresher_s": round(refresher_s, 1),
        "total_s": round(trainer_s + refresher_s, 1), "generations_made": len(refresher),
        "max_staleness_steps": summary["max_staleness_steps"],
        "wall_s": round(time.time() - t0, 1),
        **{key: summary.get(key) for key in (
            "ru_first_quarter", "ru_last_quarter", "masked_accuracy_last_quarter",
            "masked_accuracy_null_last_quarter", "examples_per_s")},
        "rerank_changed_mean": round(sum(changed) / len(changed), 4) if changed else None,
    }
    if args.qa:
        ev = subprocess.run(
            [sys.executable, os.path.join(REPO, "launch", "evaluate.py"), "retrieval",
             "--retriever", run_dir, "--corpus", summary["corpus"], "--qa", args.qa,
             "--k", args.k, "--max-block-tokens", str(args.max_block_tokens), "--no-progress"],
            cwd=REPO, capture_output=True, text=True)
        if ev.returncode != 0:
            raise RuntimeError(f"{name}: evaluate exit {ev.returncode}\n{ev.stderr[-3000:]}")
        result = last_json(ev.stdout)
        cell.update({key: value for key, value in result.items() if "recall@" in key})
    print(json.dumps(cell), file=sys.stderr, flush=True)
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", default="25,100,never",
                        help="refresh.every_steps values; 'never' = generation 0 throughout")
    parser.add_argument("--rerank", default="4,16,64",
                        help="pretrain.rerank_candidates values (pretrain.k = no re-ranking)")
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "refresh-cost"))
    parser.add_argument("--qa", default=QA, help="QA jsonl for answer recall ('' = none)")
    parser.add_argument("--k", default="5,20")
    parser.add_argument("--max-block-tokens", type=int, default=64,
                        help="word pieces of a block when evaluating (the main job's blocks)")
    args, overrides = parser.parse_known_args()
    everies = [NEVER if x == "never" else int(x) for x in args.every.split(",")]
    reranks = [int(x) for x in args.rerank.split(",")]
    cells = [run_cell(e, L, args, overrides) for e in everies for L in reranks]
    print(json.dumps({"benchmark": "refresh_cost", "steps": args.steps, "overrides": overrides,
                      "cells": cells}))


if __name__ == "__main__":
    main()
