"""The ICT warm start as a :class:`realm.training.core.Task`, and the stage that runs it."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np
import torch

from realm.config import Config, save_config
from realm.data.ict import ICTDataset, ICTExample, held_out_queries, ict_blocks, split_holdout
from realm.data.store import BlockStore, check_tokenizer
from realm.metrics import recall_at_k
from realm.modeling.embed import embed_blocks, embed_queries, special_ids
from realm.index.mips import build_index, search
from realm.losses import gather_with_grad, in_batch_nce
from realm.modeling.retriever import Retriever, load_retriever
from realm.modeling.inputs import build_block_inputs, build_query_inputs
from realm.tracking import Tracker
from realm.training.core import TrainSettings, train
from realm.training.accelerator import make_accelerator, shutdown
from realm.training.prepare import prepare_corpus

logger = logging.getLogger(__name__)

EVAL_KS = (1, 5, 20)


class ICTTask:
    """ICT on a block store: query sentence vs. its block, in-batch negatives from all ranks.

    Args:
        store: The block store.
        train_blocks: Block ids to train on.
        holdout_blocks: Block ids whose sentences evaluate recall@k (never trained on).
        special: ``(cls_id, sep_id, pad_id)``.
        accelerator: The run's accelerator (for cross-rank gathering).
        remove_prob: Probability the query sentence is removed from its block.
        max_query_tokens, max_block_tokens: Word pieces kept when encoding.
        min_query_tokens: Shortest sentence used as a query.
        seed: Seed of example sampling.
    """

    def __init__(self, store: BlockStore, train_blocks: np.ndarray, holdout_blocks: np.ndarray,
                 special: tuple[int, int, int], accelerator, remove_prob: float = 0.9,
                 max_query_tokens: int = 64, max_block_tokens: int = 288,
                 min_query_tokens: int = 5, seed: int = 0) -> None:
        self.store = store
        self.special = special
        self.accelerator = accelerator
        self.max_query_tokens = max_query_tokens
        self.max_block_tokens = max_block_tokens
        self.dataset = ICTDataset(store, train_blocks, remove_prob, max_query_tokens,
                                  min_query_tokens, seed)
        self.holdout = np.asarray(holdout_blocks, np.int64)
        self.eval_queries = held_out_queries(store, self.holdout, seed, max_query_tokens,
                                             min_query_tokens)

    def train_dataset(self) -> ICTDataset:
        return self.dataset

    def collate(self, examples: list[ICTExample]) -> dict[str, Any]:
        cls_id, sep_id, pad_id = self.special
        query = build_query_inputs([e.query_ids for e in examples], cls_id, sep_id, pad_id,
                                   max_length=self.max_query_tokens + 2)
        block = build_block_inputs([e.title_ids for e in examples], [e.body_ids for e in examples],
                                   cls_id, sep_id, pad_id, max_length=self.max_block_tokens + 3)
        return {"query": query, "block": block}

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        q, p = batch["query"], batch["block"]
        out = model(q.input_ids, q.attention_mask, p.input_ids, p.attention_mask, p.token_type_ids)
        q_all = gather_with_grad(out.q_reps, self.accelerator)  # [world * B, dim]
        p_all = gather_with_grad(out.p_reps, self.accelerator)  # [world * B, dim]
        loss, scores = in_batch_nce(q_all, p_all)
        accuracy = (scores.argmax(dim=1) == torch.arange(len(scores), device=scores.device))
        metrics = {"loss": float(loss.detach()), "in_batch_accuracy": float(accuracy.float().mean()),
                   "negatives": float(len(p_all) - 1)}
        return loss * self.accelerator.num_processes, metrics

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out sentences -> their source block among the held-out blocks: recall@k."""
        if len(self.holdout) == 0:
            return {}
        retriever = self.accelerator.unwrap_model(model)
        return ict_recall(retriever, self.store, self.eval_queries, self.holdout, self.special,
                          self.max_query_tokens, self.max_block_tokens)


def ict_recall(retriever: Retriever, store: BlockStore, queries: list[ICTExample],
               candidates: np.ndarray, special: tuple[int, int, int], max_query_tokens: int = 64,
               max_block_tokens: int = 288, ks=EVAL_KS) -> dict[str, float]:
    """recall@k of each query's source block among ``candidates`` (blocks left whole)."""
    p = embed_blocks(retriever, store, special, candidates, max_block_tokens, progress=False)[0]
    q = embed_queries(retriever, [e.query_ids for e in queries], special, max_query_tokens)
    _, idx = search(build_index(p), q, max(ks))
    hits = candidates[idx] == np.array([e.block_id for e in queries])[:, None]  # [n, k]
    return {f"ict_recall@{k}": v for k, v in recall_at_k(hits, [k for k in ks if k <= hits.shape[1]]).items()}


def run_ict(config: Config, progress: bool = True) -> dict[str, Any]:
    """The ICT stage: train the retriever on ``corpus`` (or the ``data`` section's corpus, built
    into ``cache_dir``) and save it to run_dir/retriever."""
    t = config.train
    corpus = prepare_corpus(config, progress)  # (before the accelerator: it waits on rank 0)
    config = dataclasses.replace(config, corpus=corpus)  # (saved resolved)
    accelerator, precision = make_accelerator(t, config.seed)
    store = BlockStore(corpus)
    r = config.retriever
    retriever = load_retriever(r.encoder, r.dim, r.pooling, r.encoder_layers, config.cache_dir,
                               r.max_query_tokens, r.max_block_tokens)
    if retriever.tokenizer is None:
        raise ValueError(f"retriever.encoder={r.encoder!r} has no tokenizer saved with it")
    check_tokenizer(retriever.tokenizer, store)
    special = special_ids(retriever.tokenizer)
    blocks = ict_blocks(store, min_query_tokens=config.ict.min_query_tokens)
    holdout = min(config.ict.holdout_blocks, max(0, len(blocks) - 1))
    train_blocks, holdout_blocks = split_holdout(blocks, holdout, config.seed)
    logger.info("ICT on %d blocks (%d held out) of %s", len(train_blocks), len(holdout_blocks),
                store.path)
    if accelerator.is_main_process:
        save_config(config, t.run_dir)
    accelerator.wait_for_everyone()
    task = ICTTask(store, train_blocks, holdout_blocks, special, accelerator,
                   config.ict.remove_prob, r.max_query_tokens, r.max_block_tokens,
                   config.ict.min_query_tokens, config.seed)
    tracker = Tracker.from_config(config, enabled=accelerator.is_main_process, run_name="ict")
    settings = TrainSettings.from_config(config, progress)
    world_size = accelerator.num_processes
    try:
        result = train(retriever, task, settings, accelerator, tracker, config_dict=config.to_dict(),
                       origin={"stage": "ict", "corpus": corpus,
                               "corpus_fingerprint": store.fingerprint})
        in_sync = weights_in_sync(retriever, accelerator)
        out_dir = os.path.join(t.run_dir, "retriever")
        if accelerator.is_main_process:
            accelerator.unwrap_model(retriever).save_pretrained(
                out_dir, metadata={"stage": "ict", "steps": result["steps"],
                                   "corpus_fingerprint": store.fingerprint}, overwrite=True)
        accelerator.wait_for_everyone()
    finally:
        tracker.close()
        shutdown(accelerator)
    return {
        "stage": "ict", "retriever": out_dir, "corpus": corpus, "steps": result["steps"],
        "final_loss": round(result["final_loss"], 5), "world_size": world_size,
        "negatives_per_query": t.batch_size * world_size - 1,
        "precision": precision or "fp32", "resumed_from": result["resumed_from"],
        "weights_in_sync": in_sync,
        **{k: round(v, 4) for k, v in result["last_eval"].items()},
        "examples_per_s": result["examples_per_s"], "seconds": result["seconds"],
    }


def parameters_sha256(module: torch.nn.Module) -> str:
    """A digest of a module's parameter values (in fp32)."""
    import hashlib

    sha = hashlib.sha256()
    for p in module.parameters():
        sha.update(p.detach().float().cpu().numpy().tobytes())
    return sha.hexdigest()


def weights_in_sync(model: torch.nn.Module, accelerator) -> bool:
    """Whether every process holds bit-identical parameters (a DDP sanity check)."""
    from accelerate.utils import gather_object

    digests = gather_object([parameters_sha256(accelerator.unwrap_model(model))])
    return len(set(digests)) == 1
