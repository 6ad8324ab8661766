"""The REALM pretraining step: anatomy fp32 vs bf16, the trainer with the refresher on vs off, and
retrieval inline vs prefetched.

    python benchmarks/pretrain_step.py [--corpus DIR] [--retriever DIR] [--encoder DIR]

Sizes (k, batch, token limits, masking, lr) come from ``configs/realm_mlm.yaml`` (the masked-LM
reader) unless given; the corpus, the truncated encoder and the ICT warm-started retriever
default to the ones ``launch/pretrain.py`` caches under ``runs/cache`` (built if missing; run
from the repo root).

1. **Step anatomy.** ``REALM`` + ``PretrainTask`` over an exact ``MipsIndex`` of the corpus
   (``embed_blocks``), one optimizer step after another on the same batches, first in fp32, then
   under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with a fresh model. The split is taken
   around the library's own calls: the searcher callable is wrapped; forward hooks time the query
   encoder, the document encoder (re-scoring the k retrieved blocks + null) and the
   knowledge-augmented encoder; ``forward_other`` is the rest of ``REALM.forward`` (block reads,
   input assembly, marginal loss), ``metrics`` the rest of ``PretrainTask.loss``. Backward and
   optimizer (clip + AdamW) are timed whole. ``bf16_over_fp32`` = bf16 examples/s / fp32's.
2. **Refresher on vs off.** ``launch/pretrain.py`` (the real training core, refresh hook and
   spawned refresher) runs twice, one process after the other, for the same steps with
   ``logging.log_every=1``: with an encoder snapshot every ``--every-steps`` (the refresher
   re-embeds the corpus and generations are swapped in), and with ``refresh.every_steps`` larger
   than the run (generation 0 only; the refresher idles). Step times are the differences of the
   per-step ``metrics.jsonl`` timestamps, the first ``--skip`` steps left out. ``on_over_off`` =
   median step time on / off. Snapshot steps (the trainer saves the retriever) are also reported
   apart. **Within the refresh-on run** (no drift between two runs minutes apart): the
   refresher's own metrics give the spans it was working (``[commit time - total_s, commit
   time]``); each trainer step falls wholly inside them (``embedding``) or wholly outside
   (``idle``), and ``embedding_over_idle_median`` compares the two kinds of step of one trainer.
   A third run, ``on_unshared``, is the refresh-on run with ``refresh.share_cores=false``: the
   trainer keeps all its threads while the refresher embeds beside it on the same cores.
   Pick ``--every-steps`` so that one re-embedding takes less time than that many steps, or no
   step is idle. ``--within-run RUN_DIR ...`` does only this split, for finished runs (with
   ``logging.log_every`` > 1 the unit is the interval between two log records).

3. **Prefetch** (``--parts prefetch``). The same steps of two fresh models, one searching inline
   and one with ``RetrievalPrefetch`` (``pretrain.prefetch``: the next batch's search and input
   assembly on a worker thread during the step), interleaved in blocks of 5 steps (bf16 where
   fast). Reported: retrieval work left on the training thread (inline: search + assembly;
   prefetch: submit + waits for the worker), the worker's seconds a batch, and the step medians.

The 1-minute load average before and after each part is recorded: other jobs sharing the cores
slow every step, so compare figures taken under similar load. Prints one JSON object on stdout;
progress goes to stderr.
"""

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
for _key, _value in OFFLINE.items():  # before transformers is imported: it reads them then
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from realm.cli import override  # noqa: E402
from realm.config import load_config  # noqa: E402
from realm.data.mlm import MLMDataset, collate_mlm  # noqa: E402
from realm.data.store import BlockStore  # noqa: E402
from realm.modeling.embed import embed_blocks, special_ids  # noqa: E402
from realm.index.mips import MipsIndex  # noqa: E402
from realm.modeling.readers.mlm import KnowledgeAugmentedEncoder  # noqa: E402
from realm.modeling.retriever import Retriever  # noqa: E402
from realm.training.prepare import prepare_corpus, prepare_encoder, prepare_retriever  # noqa: E402
from realm.modeling.realm import REALM  # noqa: E402
from realm.training.pretrain import PretrainTask  # noqa: E402
from realm.training.prefetch import RetrievalPrefetch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "realm_mlm.yaml")

logger = logging.getLogger("pretrain_step")


class Timer:
    """Seconds spent per named region, summed over calls (CPU ops run synchronously)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._open = {}

    def hook(self, module: torch.nn.Module, name: str) -> None:
        """Time every forward call of ``module`` under ``name``."""
        def start(module, inputs):
            self._open[name] = time.perf_counter()

        def stop(module, inputs, output):
            self.add(name, self._open.pop(name))

        module.register_forward_pre_hook(start)
        module.register_forward_hook(stop)

    def add(self, name: str, since: float) -> None:
        self.seconds[name] += time.perf_counter() - since

    def wrap(self, fn, name: str):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, t0)
        return timed


def build_model(paths: dict, store: BlockStore, config) -> REALM:
    p, r = config.pretrain, config.retriever
    retriever = Retriever.from_pretrained(paths["retriever"])
    encoder = KnowledgeAugmentedEncoder.from_checkpoint(paths["encoder"])
    return REALM(retriever, encoder, store, special_ids(retriever.tokenizer), k=p.k,
                 max_query_tokens=r.max_query_tokens, max_block_tokens=r.max_block_tokens,
                 max_joined_tokens=p.max_joined_tokens)


def anatomy(paths: dict, store: BlockStore, index: MipsIndex, dataset: MLMDataset, config,
            batches: list[list[int]], warmup: int, bf16: bool) -> dict:
    """Time ``len(batches) - warmup`` training steps of a fresh model; split each step."""
    torch.manual_seed(config.seed)
    model = build_model(paths, store, config).train()
    timer = Timer()
    task = PretrainTask(dataset, timer.wrap(
        lambda q, k, exclude: index.search(q, k, exclude=exclude), "search"))
    timer.hook(model.retriever.query_encoder, "query_encoder_forward")
    timer.hook(model.retriever.doc_encoder, "block_encoder_forward")
    timer.hook(model.encoder, "ka_encoder_forward")
    timer.hook(model, "realm_forward")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr,
                                  weight_decay=config.train.weight_decay)
    max_norm = config.train.max_grad_norm
    step_times, candidates = [], []
    for i, ids in enumerate(batches):
        if i == warmup:
            timer.seconds.clear()
        t0 = time.perf_counter()
        batch = task.collate([dataset[j] for j in ids])
        timer.add("data", t0)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = task.loss(model, batch)
        timer.add("task_loss", t)
        t = time.perf_counter()
        loss.backward()
        timer.add("backward", t)
        t = time.perf_counter()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.add("optimizer", t)
        if i >= warmup:
            step_times.append(time.perf_counter() - t0)
            out = task.last[0]
            candidates.append(int((out.block_ids >= 0).sum()))
    s = dict(timer.seconds)
    split = {
        "data": s["data"],
        "search": s["search"],
        "query_encoder_forward": s["query_encoder_forward"],
        "block_encoder_forward": s["block_encoder_forward"],
        "ka_encoder_forward": s["ka_encoder_forward"],
        "forward_other": s["realm_forward"] - s["search"] - s["query_encoder_forward"]
        - s["block_encoder_forward"] - s["ka_encoder_forward"],
        "metrics": s["task_loss"] - s["realm_forward"],
        "backward": s["backward"],
        "optimizer": s["optimizer"],
    }
    total = sum(step_times)
    n = len(step_times)
    return {
        "precision": "bf16" if bf16 else "fp32", "steps": n,
        "examples_per_s": round(n * len(batches[0]) / total, 3),
        "median_step_s": round(statistics.median(step_times), 4),
        "mean_step_s": round(total / n, 4),
        "split_s_per_step": {k: round(v / n, 4) for k, v in split.items()},
        "split_fraction": {k: round(v / total, 3) for k, v in split.items()},
        "retrieved_per_step": round(float(np.mean(candidates)), 1),
        "final_loss": round(float(loss.detach()), 4),
    }


def refresher_overlap(run_dir: str, times: dict[int, float], skip: int) -> dict:
    """Trainer step times split by what the refresher was doing (see the module docstring).

    ``times`` maps logged steps to their timestamps; between two consecutive logged steps the
    time per step is the interval over the steps it spans (``logging.log_every`` of them).
    """
    path = os.path.join(run_dir, "refresher", "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        busy = [(r["time"] - r["refresh/total_s"], r["time"]) for r in map(json.loads, f)
                if "refresh/total_s" in r]
    split: dict[str, list[float]] = {"embedding": [], "idle": []}
    steps = sorted(s for s in times if s > skip)
    for prev, s in zip(steps, steps[1:]):
        start, end = times[prev], times[s]
        inside = sum(max(0.0, min(end, b) - max(start, a)) for a, b in busy) / (end - start)
        if inside >= 0.99:
            split["embedding"].append((end - start) / (s - prev))
        elif inside <= 0.01:
            split["idle"].append((end - start) / (s - prev))
    out = {f"{k}_intervals": len(v) for k, v in split.items()}
    out["refresher_busy_spans"] = len(busy)
    for k, v in split.items():
        if v:
            out[f"{k}_median_step_s"] = round(statistics.median(v), 4)
    if split["embedding"] and split["idle"]:
        out["embedding_over_idle_median"] = round(
            statistics.median(split["embedding"]) / statistics.median(split["idle"]), 3)
    return out


def within_run(run_dir: str, skip: int) -> dict:
    """:func:`refresher_overlap` of a finished run directory (any ``logging.log_every``)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        times = {r["step"]: r["time"] for r in map(json.loads, f) if "loss" in r}
    return {"run_dir": run_dir, **refresher_overlap(run_dir, times, skip)}


def pretrain_run(name: str, paths: dict, args, workdir: str, every_steps: int,
                 share_cores: bool = True) -> dict:
    """``launch/pretrain.py`` as a child process; per-step times from its ``metrics.jsonl``."""
    run_dir = os.path.join(workdir, name)
    cmd = [sys.executable, os.path.join(REPO, "launch", "pretrain.py"), "--config", CONFIG,
           "--no-progress", override("corpus", paths["corpus"]),
           override("pretrain.retriever", paths["retriever"]),
           override("pretrain.encoder", paths["encoder"]), "pretrain.encoder_layers=null",
           f"pretrain.k={args.k}", f"train.batch_size={args.batch_size}",
           f"train.steps={args.part2_steps}", f"train.precision={args.precision}",
           "train.save_every=0", "pretrain.table_every=0", "logging.log_every=1",
           "logging.wandb=false", f"refresh.every_steps={every_steps}",
           f"refresh.threads={args.refresh_threads}", f"train.threads={args.threads}",
           f"refresh.share_cores={str(share_cores).lower()}", override("train.run_dir", run_dir)]
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": str(args.threads)}
    logger.info("%s: %d steps, snapshot every %d", name, args.part2_steps, every_steps)
    t0, load = time.time(), os.getloadavg()[0]
    with open(os.path.join(workdir, f"{name}.log"), "w") as log:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
    if done.returncode != 0:
        with open(log.name) as f:
            raise RuntimeError(f"{name} failed ({done.returncode}):\n{f.read()[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    times = {r["step"]: r["time"] for r in records if "loss" in r}
    steps = sorted(s for s in times if s - 1 in times and s > args.skip)
    step_s = {s: times[s] - times[s - 1] for s in steps}
    values = list(step_s.values())
    out = {
        "steps_timed": len(values), "every_steps": every_steps,
        "median_step_s": round(statistics.median(values), 4),
        "mean_step_s": round(statistics.mean(values), 4),
        "max_step_s": round(max(values), 4),
        "examples_per_s": summary["examples_per_s"],
        "generations_swapped": summary["generations_swapped"],
        "max_staleness_steps": summary["max_staleness_steps"],
        "precision": summary["precision"], "process_s": round(time.time() - t0, 1),
        "loadavg_1m_before_after": [round(load, 2), round(os.getloadavg()[0], 2)],
    }
    snap = [v for s, v in step_s.items() if s % every_steps == 0]
    if snap:  # after_step publishes the encoder at these steps, inside their timed interval
        out["median_snapshot_step_s"] = round(statistics.median(snap), 4)
        out["median_other_step_s"] = round(
            statistics.median([v for s, v in step_s.items() if s % every_steps]), 4)
    overlap = refresher_overlap(run_dir, times, args.skip)
    if overlap:
        out["within_run"] = overlap
    return out


def prefetch_split(paths: dict, store: BlockStore, index: MipsIndex, dataset: MLMDataset, config,
                   batches: list[list[int]], warmup: int, bf16: bool) -> dict:
    """The same steps of a fresh model with retrieval inline and with ``RetrievalPrefetch``
    (``pretrain.prefetch``), interleaved in blocks of 5 steps so that both share the machine's
    state; what retrieval costs the training thread in each."""
    collated = [collate_mlm([dataset[j] for j in ids]) for ids in batches]
    out = {}
    models, tasks, timers, times = {}, {}, {}, {"inline": [], "prefetch": []}
    for mode in ("inline", "prefetch"):
        torch.manual_seed(config.seed)
        model = build_model(paths, store, config).train()
        timer = Timer()
        search = timer.wrap(lambda q, k, exclude: index.search(q, k, exclude=exclude), "search")
        prefetcher = (RetrievalPrefetch(search, lambda: torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=bf16)) if mode == "prefetch" else None)
        assemble = model.assemble

        def timed_assemble(*a, _assemble=assemble, _timer=timer, **kw):  # training thread only
            if threading.current_thread() is not threading.main_thread():
                return _assemble(*a, **kw)
            t0 = time.perf_counter()
            try:
                return _assemble(*a, **kw)
            finally:
                _timer.add("assemble", t0)
        model.assemble = timed_assemble
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
        models[mode], tasks[mode], timers[mode] = (model, optimizer), PretrainTask(
            dataset, search, prefetcher), timer
    n = len(collated)
    for start in range(0, n, 5):
        for mode in ("inline", "prefetch"):
            (model, optimizer), task, timer = models[mode], tasks[mode], timers[mode]
            for i in range(start, min(n, start + 5)):
                t0 = time.perf_counter()
                if task.prefetch is not None and i + 1 < n:
                    t = time.perf_counter()
                    task.prefetch(model, collated[i + 1])
                    timer.add("submit", t)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss, _ = task.loss(model, collated[i])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if i >= warmup:
                    times[mode].append(time.perf_counter() - t0)
                elif i == warmup - 1:
                    timer.seconds.clear()
    for mode in ("inline", "prefetch"):
        task, timer, steps = tasks[mode], timers[mode], len(times[mode])
        s = dict(timer.seconds)
        row = {"median_step_s": round(statistics.median(times[mode]), 4),
               "mean_step_s": round(sum(times[mode]) / steps, 4),
               # what retrieval costs the training thread: inline search and assembly, and with
               # prefetch the submit plus any wait for the prefetch thread (copy, result)
               "training_thread_retrieval_s_per_step": round(
                   (s.get("search", 0.0) * (mode == "inline") + s.get("assemble", 0.0)
                    + s.get("submit", 0.0)) / steps
                   + (task.prefetcher.waited_s / steps if task.prefetcher else 0.0), 5)}
        if mode == "inline":
            row["search_s_per_step"] = round(s.get("search", 0.0) / steps, 5)
            row["assemble_s_per_step"] = round(s.get("assemble", 0.0) / steps, 5)
        else:
            summary = task.prefetcher.summary()
            row.update({"submit_s_per_step": round(s.get("submit", 0.0) / steps, 5),
                        "prefetch_thread_s_per_batch": summary["work_s_per_batch"],
                        "hits": summary["hits"], "misses": summary["misses"]})
            task.prefetcher.close()
        out[mode] = row
    out["retrieval_on_training_thread_inline_over_prefetch"] = round(
        out["inline"]["training_thread_retrieval_s_per_step"]
        / max(out["prefetch"]["training_thread_retrieval_s_per_step"], 1e-9), 2)
    out["step_prefetch_over_inline_median"] = round(
        out["prefetch"]["median_step_s"] / out["inline"]["median_step_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help="corpus directory (default: the cached pretraining one)")
    parser.add_argument("--retriever", help="saved retriever (default: the cached ICT warm start)")
    parser.add_argument("--encoder", help="knowledge-augmented encoder checkpoint "
                        "(default: the cached truncated copy of pretrain.encoder)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per precision (part 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (part 1)")
    parser.add_argument("--batch-size", type=int, help="default: train.batch_size of the config")
    parser.add_argument("--k", type=int, help="default: pretrain.k of the config")
    parser.add_argument("--threads", type=int, default=2, help="trainer threads")
    parser.add_argument("--part2-steps", type=int, default=30, help="steps of each run (part 2)")
    parser.add_argument("--every-steps", type=int, default=5,
                        help="encoder snapshot every N steps in the refresh-on run (part 2)")
    parser.add_argument("--skip", type=int, default=3, help="first steps not timed (part 2)")
    parser.add_argument("--refresh-threads", type=int, default=1, help="refresher threads")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="train.precision of the part 2 runs")
    parser.add_argument("--parts", default="anatomy,refresh")
    parser.add_argument("--within-run", nargs="+", metavar="RUN_DIR",
                        help="only split the step times of these finished runs by what their "
                        "refresher was doing, and print that")
    args = parser.parse_args()
    if args.within_run:
        print(json.dumps({"benchmark": "pretrain_step", "within_run": [
            within_run(run_dir, args.skip) for run_dir in args.within_run]}))
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    overrides = [f"{key}={value}" for key, value in
                 (("pretrain.k", args.k), ("train.batch_size", args.batch_size)) if value]
    config = load_config(CONFIG, overrides)
    args.k, args.batch_size = config.pretrain.k, config.train.batch_size
    corpus = args.corpus or prepare_corpus(config, progress=False)
    encoder = args.encoder or prepare_encoder(config)
    retriever = args.retriever or prepare_retriever(config, corpus, encoder)
    paths = {k: os.path.abspath(v) for k, v in
             (("corpus", corpus), ("encoder", encoder), ("retriever", retriever))}
    config = dataclasses.replace(config, corpus=paths["corpus"], pretrain=dataclasses.replace(
        config.pretrain, encoder=paths["encoder"], retriever=paths["retriever"]))
    store = BlockStore(paths["corpus"])
    out = {"benchmark": "pretrain_step", **paths, "blocks": len(store), "k": args.k,
           "batch_size": args.batch_size, "threads": args.threads,
           "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}

    if "anatomy" in args.parts or "prefetch" in args.parts:
        retriever_model = Retriever.from_pretrained(paths["retriever"])
        emb, stats = embed_blocks(retriever_model, store, special_ids(retriever_model.tokenizer),
                                  max_block_tokens=config.retriever.max_block_tokens,
                                  bf16=out["mkldnn_bf16"], progress=False)
        index = MipsIndex.build(emb, factory=config.index.factory, gpu=False)
        logger.info("index of %d blocks (%.1f blocks/s)", len(emb), stats["blocks_per_s"])
        dataset = MLMDataset(store, retriever_model.tokenizer.mask_token_id,
                             masking=config.pretrain.masking,
                             max_query_tokens=config.retriever.max_query_tokens, seed=config.seed)
        order = np.random.default_rng(config.seed).permutation(len(dataset))
        n = args.warmup + args.steps
        batches = [order[i * args.batch_size:(i + 1) * args.batch_size].tolist() for i in range(n)]
        if "prefetch" in args.parts:
            logger.info("retrieval inline against prefetched")
            out["prefetch"] = {"loadavg_1m_before": round(os.getloadavg()[0], 2),
                               **prefetch_split(paths, store, index, dataset, config, batches,
                                                args.warmup, out["mkldnn_bf16"]),
                               "loadavg_1m_after": round(os.getloadavg()[0], 2)}
    if "anatomy" in args.parts:
        runs = {"loadavg_1m_before": round(os.getloadavg()[0], 2)}
        for bf16 in (False, True):
            logger.info("step anatomy, %s", "bf16" if bf16 else "fp32")
            runs["bf16" if bf16 else "fp32"] = anatomy(paths, store, index, dataset, config,
                                                       batches, args.warmup, bf16)
        out["anatomy"] = {**runs, "loadavg_1m_after": round(os.getloadavg()[0], 2),
                          "bf16_over_fp32": round(runs["bf16"]["examples_per_s"]
                                                  / runs["fp32"]["examples_per_s"], 3)}

    if "refresh" in args.parts:
        with tempfile.TemporaryDirectory() as workdir:
            off = pretrain_run("refresh_off", paths, args, workdir, every_steps=10 ** 9)
            on = pretrain_run("refresh_on", paths, args, workdir, every_steps=args.every_steps)
            unshared = pretrain_run("refresh_on_unshared", paths, args, workdir,
                                    every_steps=args.every_steps, share_cores=False)
        out["refresh"] = {
            "steps": args.part2_steps, "refresh_threads": args.refresh_threads,
            "off": off, "on": on, "on_unshared": unshared,
            "on_over_off_median": round(on["median_step_s"] / off["median_step_s"], 3),
            "on_over_off_mean": round(on["mean_step_s"] / off["mean_step_s"], 3),
            "unshared_over_off_mean": round(unshared["mean_step_s"] / off["mean_step_s"], 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
