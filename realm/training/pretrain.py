"""REALM pretraining: the training core's task, its hooks and the stage.

The model and one step's computation are :class:`realm.modeling.realm.REALM` (retriever + reader,
candidates in, marginal out); the next batch's retrieval can run ahead on a background thread
(:class:`realm.training.prefetch.RetrievalPrefetch`). Here: :class:`PretrainTask` (the loss and
metrics of a step), the :class:`ExampleTable` and :class:`FirstGenerationCache` hooks, and
:func:`run_pretrain`, which prepares what is not given and trains beside the index refresher
(``docs/pretraining.md``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from realm.cache import cache_path
from realm.config import save_config
from realm.data.mlm import MLMBatch, MLMDataset, collate_mlm, mlm_blocks
from realm.data.store import BlockStore, check_tokenizer
from realm.fsutil import sha256_file
from realm.evaluate.span_recall import HeldOutSpans, span_hits
from realm.index.mips import SearchResult, check_factory
from realm.index.plan import check_plan
from realm.index.shards import SHARD_BLOCKS
from realm.metrics import paired_recall
from realm.modeling.embed import special_ids
from realm.modeling.readers import CausalLMReader, load_reader
from realm.modeling.realm import REALM, REALMOutput, Searcher
from realm.modeling.realm_metrics import marginal_predictions, realm_metrics
from realm.modeling.retriever import Retriever
from realm.precision import cpu_threads
from realm.refresh.hook import RefreshHook
from realm.refresh.rundir import RunStore
from realm.refresh.supervisor import check_devices
from realm.report import ReportHook
from realm.report.headline import quarter_values
from realm.tracking import Tracker, offline_sync_command, read_metrics
from realm.training.accelerator import make_accelerator, shutdown
from realm.training.checkpoint import checkpoints
from realm.training.core import TrainSettings, train
from realm.training.prefetch import RetrievalPrefetch
from realm.training.prepare import (prepare_adapted_encoder, prepare_corpus, prepare_encoder,
                                    prepare_retriever)

logger = logging.getLogger(__name__)


class PretrainTask:
    """The training core's task for REALM pretraining.

    Args:
        dataset: Masked examples (:class:`MLMDataset`).
        searcher: Index search over the generation in use (the refresh hook's watcher).
    """

    def __init__(self, dataset: MLMDataset, searcher: Searcher,
                 prefetcher: Optional[RetrievalPrefetch] = None):
        self.dataset = dataset
        self.searcher = searcher
        self.prefetcher = prefetcher
        # the training core calls it with the next batch before each step (None: no lookahead)
        self.prefetch = prefetcher.submit if prefetcher is not None else None
        self.last: Optional[tuple[REALMOutput, MLMBatch]] = None  # for the examples table

    def train_dataset(self) -> MLMDataset:
        return self.dataset

    def collate(self, examples) -> MLMBatch:
        return collate_mlm(examples)

    def loss(self, model: nn.Module, batch: MLMBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        prefetched = self.prefetcher.take(batch) if self.prefetcher is not None else None
        out = model(batch, self.searcher, prefetched)
        if self.prefetcher is not None:  # the next batch's copy of the weights is taken
            self.prefetcher.wait_for_copy()  # before backward and the optimizer change them
        self.last = (dataclasses.replace(  # (the logits are not kept: the predictions are)
            out, mlm_logits=None, log_p_z=out.log_p_z.detach(), loss=None,
            log_p_y_given_z=out.log_p_y_given_z.detach(),
            retrieval_logits=out.retrieval_logits.detach()), batch)
        metrics = realm_metrics(out, batch)
        changed = getattr(model, "module", model).rerank_changed
        if changed is not None:  # how much of the stale index's top k re-ranking replaced
            metrics["rerank_changed"] = changed
        if self.prefetcher is not None:  # the training thread's wait for the prefetch thread
            metrics["prefetch/hit"] = float(prefetched is not None)
            metrics["prefetch/wait_s"] = self.prefetcher.last_wait_s
        return out.loss, metrics

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}


# ---------------------------------------------------------------------------------------------
# Examples table (wandb when enabled, the metrics JSONL always)


class ExampleTable:
    """A training-core hook that logs a few examples every ``every`` steps (main process).

    Columns: the masked query, the gold span, the retrieved titles with ``p(z|x)`` (the null
    document as ``∅``), and the marginal prediction at the masked positions.
    """

    COLUMNS = ["step", "masked_text", "gold", "retrieved", "prediction", "p_null"]

    def __init__(self, task: "PretrainTask", tracker, tokenizer, store: BlockStore, every: int,
                 n: int = 4):
        self.task, self.tracker, self.tokenizer, self.store = task, tracker, tokenizer, store
        self.every, self.n = every, n

    def after_step(self, step: int, model: nn.Module) -> None:
        if not self.every or step % self.every or self.task.last is None:
            return
        self.tracker.log_table("examples", self.COLUMNS, self.rows(step), step=step)

    def rows(self, step: int) -> list[list[Any]]:
        out, batch = self.task.last
        decode = self.tokenizer.decode
        predicted = marginal_predictions(out)  # [B, M]
        p_z = out.log_p_z.exp().cpu()  # [B, k + 1]
        rows = []
        for i in range(min(self.n, len(batch.query_ids))):
            keep = batch.target_mask[i]
            retrieved = [f"{self.store.title(int(b))} ({float(p):.3f})"
                         for b, p in zip(out.block_ids[i].tolist(), p_z[i, :-1].tolist()) if b >= 0]
            retrieved.append(f"∅ ({float(p_z[i, -1]):.3f})")
            rows.append([step, decode(batch.query_ids[i].tolist()),
                         decode(batch.target_ids[i][keep].tolist()), " | ".join(retrieved),
                         # (a causal-LM reader predicts the whole span or nothing: -1)
                         decode([t for t in predicted[i][keep].tolist() if t >= 0]) or "-",
                         round(float(p_z[i, -1]), 4)])
        return rows


# ---------------------------------------------------------------------------------------------
# The stage: prepare (corpus, small encoder, MLM adaptation, ICT warm start;
# realm.training.prepare), then train beside the refresher


class FirstGenerationCache:
    """Generation 0 of a fresh run, reused across runs that start from the same retriever.

    Every run that starts from one warm-started retriever on one corpus would otherwise wait for
    the refresher to embed the whole corpus before its first step. The first such run saves the
    embeddings of its generation 0 (encoder step 0) under ``path``; later fresh runs commit them as
    their own generation 0 before the refresher starts (exact indexes only: others would need
    their trained index too). A training-core hook (main process).

    Args:
        path: The cache file (``.npy``, float16 ``[n_blocks, dim]``).
        watcher: The trainer's index watcher (its generation in use).
    """

    def __init__(self, path: str, watcher):
        self.path, self.watcher = path, watcher

    @staticmethod
    def key_path(cache_dir: str, retriever_dir: str, corpus_fingerprint: str, config) -> str:
        """``cache_dir/gen0-KEY.npy``, keyed by the warm-started retriever, the corpus and what
        changes the embeddings (block length, the refresher's precision and device)."""
        return cache_path(cache_dir, "gen0", [
            sha256_file(os.path.join(retriever_dir, "manifest.json")), corpus_fingerprint,
            config.retriever.max_block_tokens, config.refresh.precision,
            config.refresh.device]) + ".npy"

    def seed(self, store, corpus_fingerprint: str, factory: str,
             shard_blocks: int = SHARD_BLOCKS) -> bool:
        """Commit the cached embeddings as generation 0 of a run that has no index yet."""
        if factory != "Flat" or not os.path.exists(self.path) or store.read_latest() is not None:
            return False
        embeddings = np.load(self.path, mmap_mode="r")  # (read shard by shard as it is written)
        store.commit_generation(embeddings, encoder_step=0, corpus_fingerprint=corpus_fingerprint,
                                factory=factory, extra={"seeded_from": self.path},
                                shard_blocks=shard_blocks)
        logger.info("generation 0 from the cache %s (no wait for the refresher)", self.path)
        return True

    def after_step(self, step: int, model: nn.Module) -> None:
        current = self.watcher.current
        if (os.path.exists(self.path) or current is None or current.encoder_step != 0
                or current.shard is not None):
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}.npy"
        np.save(tmp, current.read_embeddings())  # (read from the store once, not kept)
        os.replace(tmp, self.path)  # complete or absent
        logger.info("cached generation 0 in %s", self.path)


def _null_searcher(queries: np.ndarray, k: int, exclude) -> SearchResult:
    """The control run's "index": nothing retrieved, so the null document is the only candidate."""
    empty = np.zeros((len(queries), 0))
    return SearchResult(scores=empty.astype(np.float32), block_ids=empty.astype(np.int64))


def run_pretrain(config, progress: bool = True) -> dict[str, Any]:
    """REALM pretraining beside an index refresher (see the module docstring).

    Prepares what is not given (the corpus, a truncated encoder, an ICT warm start; all cached),
    then trains with the shared core: the refresh hook publishes document-encoder snapshots every
    ``refresh.every_steps``, supervises the refresher and swaps in its generations between steps.

    Returns:
        The run's summary (steps, final loss, RU, generations swapped, staleness, seconds).
    """
    t0 = time.time()
    p, t, r = config.pretrain, config.train, config.retriever
    check_devices(config.refresh.devices)  # (before minutes of preparation)
    if not p.null_only:
        check_factory(config.index.factory, r.dim)
    corpus_dir = prepare_corpus(config, progress)
    for path in (corpus_dir, p.examples):  # a bad corpus is named now, not after the warm starts
        if path:
            BlockStore(path)
    if not p.null_only:  # an index this machine cannot hold, or a factory this corpus cannot
        check_plan(config, blocks=len(BlockStore(corpus_dir)))  # train: refused in one line
    encoder_name = prepare_encoder(config)
    retriever_dir = prepare_retriever(config, corpus_dir, encoder_name)
    reader_name = (p.lm if p.reader_type == "causal_lm"
                   else prepare_adapted_encoder(config, corpus_dir, p.reader or encoder_name))
    config = dataclasses.replace(
        # the resolved config starts from the adapted reader, adaptation done (relaunchable as is)
        config, corpus=corpus_dir,
        pretrain=dataclasses.replace(p, retriever=retriever_dir, reader=reader_name, mlm_steps=0))
    p = config.pretrain
    prepare_s = time.time() - t0

    accelerator, precision = make_accelerator(t, config.seed)
    is_main = accelerator.is_main_process
    store = BlockStore(corpus_dir)
    examples_store = BlockStore(p.examples) if p.examples else store
    retriever = Retriever.from_pretrained(retriever_dir)
    retriever.max_query_tokens, retriever.max_block_tokens = r.max_query_tokens, r.max_block_tokens
    check_tokenizer(retriever.tokenizer, store)
    check_tokenizer(retriever.tokenizer, examples_store)
    encoder = (CausalLMReader.from_checkpoint(reader_name, store=store,
                                              examples_store=examples_store,
                                              layout=p.lm_layout, mode=p.lm_mode,
                                              lora_rank=p.lm_lora_rank,
                                              lora_alpha=p.lm_lora_alpha, precision=t.precision)
               if p.reader_type == "causal_lm" else load_reader(reader_name))
    if encoder.tokenizer is not None:  # (a reader of another vocabulary reads nonsense)
        check_tokenizer(encoder.tokenizer, store, what=f"reader {reader_name!r}")
    model = REALM(retriever, encoder, store, special_ids(retriever.tokenizer),
                  k=0 if p.null_only else p.k, max_query_tokens=r.max_query_tokens,
                  max_block_tokens=r.max_block_tokens, max_joined_tokens=p.max_joined_tokens,
                  exclude_source=examples_store is store,
                  retriever_signal=p.retriever_signal, min_ru=p.retriever_min_ru,
                  freeze_reader=p.reader_lr_scale == 0 or (p.reader_type == "causal_lm"
                                                           and p.lm_mode == "frozen"),
                  marginal=p.marginal, vocab_chunk=p.vocab_chunk,
                  rerank_candidates=p.rerank_candidates,
                  pdist_temperature=p.pdist_temperature, signal_control=p.signal_control,
                  seed=config.seed)
    if p.gradient_checkpointing:
        encoder.enable_gradient_checkpointing()
    held = (HeldOutSpans.draw(examples_store, retriever.tokenizer.mask_token_id,
                              p.span_recall_examples, r.max_query_tokens, config.seed)
            if p.span_recall_examples else None)
    train_blocks = mlm_blocks(examples_store, p.spanless_blocks == "skip")
    if held is not None:  # the held-out sentences' blocks are never trained on
        train_blocks = np.setdiff1d(train_blocks, held.blocks)
    dataset = MLMDataset(examples_store, retriever.tokenizer.mask_token_id, masking=p.masking,
                         block_ids=train_blocks, max_query_tokens=r.max_query_tokens,
                         seed=config.seed)
    if accelerator.is_main_process:
        save_config(config, t.run_dir)
    accelerator.wait_for_everyone()
    hook = None
    searcher: Searcher = _null_searcher
    if not p.null_only:
        hook = RefreshHook.from_config(
            config, accelerator, model, lambda m: accelerator.unwrap_model(m).retriever,
            corpus_fingerprint=store.fingerprint, dim=retriever.dim,
            cpu_threads=cpu_threads(t.threads), publish_after=p.retriever_hold_steps)
        searcher = hook.searcher(accelerator)
        first = FirstGenerationCache(
            FirstGenerationCache.key_path(config.cache_dir, retriever_dir, store.fingerprint, config),
            hook.watcher)
        if accelerator.is_main_process and not checkpoints(t.run_dir):
            first.seed(RunStore(t.run_dir), store.fingerprint, config.index.factory,
                       config.index.shard_blocks)
        accelerator.wait_for_everyone()
    prefetcher = (RetrievalPrefetch(searcher, accelerator.autocast)
                  if p.prefetch and not p.null_only else None)
    task = PretrainTask(dataset, searcher, prefetcher)
    tracker = Tracker.from_config(config, enabled=accelerator.is_main_process)
    hooks: list[Any] = [hook] if hook else []
    if hook is not None and accelerator.is_main_process:
        hooks.append(first)
    if accelerator.is_main_process and p.table_every:
        hooks.append(ExampleTable(task, tracker, retriever.tokenizer, store, p.table_every))
    if accelerator.is_main_process and config.logging.report_every:
        hooks.append(ReportHook(t.run_dir, config.logging.report_every))
    settings = TrainSettings.from_config(
        config, progress, eval_every=0,
        lr_scales={"retriever.": p.retriever_lr_scale, "encoder.": p.reader_lr_scale},
        lr_holds={"retriever.": p.retriever_hold_steps},
        betas={"retriever.": (p.retriever_momentum, 0.999)} if p.retriever_momentum != 0.9 else None)
    world_size = accelerator.num_processes
    finished = False
    prefetch_stats = None
    try:
        result = train(model, task, settings, accelerator, tracker, hooks=hooks,
                       config_dict=config.to_dict(),
                       origin={"stage": "pretrain", "corpus": corpus_dir,
                               "corpus_fingerprint": store.fingerprint})
        finished = True
        if accelerator.is_main_process:
            meta = {"stage": "pretrain", "steps": result["steps"]}
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.retriever.save_pretrained(os.path.join(t.run_dir, "retriever"),
                                                overwrite=True, metadata=meta)
            unwrapped.encoder.save_pretrained(os.path.join(t.run_dir, "reader"),
                                              overwrite=True, metadata=meta)
        accelerator.wait_for_everyone()
    finally:
        if prefetcher is not None:
            prefetcher.close()
            prefetch_stats = prefetcher.summary()
        if hook is not None:
            hook.close(finished=finished)
        tracker.close()
        del model, task, hooks, prefetcher
        shutdown(accelerator)
    # (not accelerator.is_main_process: after shutdown that would start a new process group)
    if is_main and config.logging.report_every:  # the dashboard, with the last steps too
        ReportHook(t.run_dir, config.logging.report_every).draw()
    sync = None
    if is_main and config.logging.wandb and config.logging.wandb_mode == "offline":
        sync = offline_sync_command(t.run_dir)  # the trainer's run and the refresher's, together
        if sync:
            logger.info("wandb is offline: upload this run (trainer and refresher) with: %s", sync)
    records = read_metrics(t.run_dir) if is_main else []
    recall: dict[str, Optional[float]] = {}
    if is_main and held is not None and not p.null_only:
        hits = {name: span_hits(Retriever.from_pretrained(path), store, held, p.k,
                                r.max_block_tokens, r.max_query_tokens, config.refresh.precision,
                                examples_store)
                for name, path in (("start", retriever_dir),
                                   ("end", os.path.join(t.run_dir, "retriever")))}
        if len(held.examples):  # paired on the same sentences: gained, lost, sign test
            paired = paired_recall(hits["start"][:, None], hits["end"][:, None], [1])["1"]
            recall = {"span_recall_start": paired["before"], "span_recall_end": paired["after"],
                      "span_recall_gained": paired["gained"], "span_recall_lost": paired["lost"],
                      "span_recall_p": paired["p_value"]}
    ru = [x["ru_expected"] for x in records if "ru_expected" in x]
    quarters = quarter_means(records, t.steps, {
        "ru": "ru_expected", "masked_accuracy": "masked_accuracy",
        "masked_accuracy_null": "masked_accuracy_null", "loss": "loss", "loss_null": "loss_null",
        "p_null": "p_null"})
    return {
        "stage": "pretrain", "run_dir": t.run_dir, "steps": result["steps"],
        # what the run read and started from, so both can be evaluated (launch/evaluate.py)
        "corpus": os.path.abspath(corpus_dir),
        "warm_start_retriever": os.path.abspath(retriever_dir),
        # a run resumed at its last step trains nothing: no loss (None, not NaN, in the JSON)
        "final_loss": round(result["final_loss"], 5) if np.isfinite(result["final_loss"]) else None,
        "final_masked_accuracy": next((round(x["masked_accuracy"], 4) for x in reversed(records)
                                       if "masked_accuracy" in x), None),
        "mean_ru": round(float(np.mean(ru)), 5) if ru else None,
        "final_ru": round(ru[-1], 5) if ru else None,
        **quarters, **recall, "span_recall_examples": len(held.examples) if held else 0,
        "generations_swapped": len(hook.generations_used) if hook else 0,
        "index_shards": hook.shards if hook else 0,
        **({"prefetch": prefetch_stats} if prefetch_stats else {}),
        "max_staleness_steps": hook.max_staleness_steps if hook else 0,
        "world_size": world_size, "precision": precision or "fp32",
        "examples_per_s": result["examples_per_s"], "resumed_from": result["resumed_from"],
        "prepare_s": round(prepare_s, 1), "seconds": round(time.time() - t0, 1),
        **({"wandb_sync": sync} if sync else {}),
    }


def quarter_means(records: list[dict[str, Any]], steps: int, keys: dict[str, str]
                  ) -> dict[str, Optional[float]]:
    """Means of logged metrics over the first and the last quarter of a run's steps.

    A record logged at step ``s`` summarises the steps since the one before, so it belongs to
    the first quarter when ``s <= steps / 4`` and to the last when ``s > 3 steps / 4``.

    Args:
        records: The run's metric records (each with ``step``).
        steps: The run's total steps.
        keys: Summary name -> metric name, e.g. ``{"ru": "ru_expected"}``.

    Returns:
        ``{NAME_first_quarter, NAME_last_quarter}`` for every key (None where nothing was
        logged), rounded to 5 digits.
    """
    out: dict[str, Optional[float]] = {}
    for name, metric in keys.items():  # the report's rule (realm.report.headline), one home
        for part, values in quarter_values(records, steps, metric).items():
            out[f"{name}_{part}"] = round(float(np.mean(values)), 5) if values else None
    return out
