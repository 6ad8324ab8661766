"""Open-QA fine-tuning (REALM, Guu et al. 2020, section 3.4): the training task and the stage.

The document index stays fixed (:mod:`realm.retrieval.fixed`); the query encoder and the span
reader of :class:`realm.modeling.openqa.OpenQAModel` train on the span-marginal loss, first beside
each question's positive block (:mod:`realm.training.positives`), then over the top k retrieved
blocks. The run writes ``model/`` (read by ``launch/evaluate.py openqa --model`` and
:class:`realm.qa.OpenQA`) and the dev predictions (:mod:`realm.evaluate.openqa`).
``openqa.reader_type: generative`` trains a RAG generator instead (:mod:`realm.training.rag`);
what both readers share is in :mod:`realm.training.openqa_setup`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from realm.config import save_config
from realm.data.qa import QABatch, QADataset, QAExample, collate_qa
from realm.data.store import check_tokenizer
from realm.modeling.openqa import OpenQAModel
from realm.modeling.span_reader import MANIFEST_KIND as READER_KIND
from realm.modeling.span_reader import SpanReader
from realm.retrieval.fixed import save_openqa_model
from realm.tracking import Tracker
from realm.training.accelerator import shutdown
from realm.training.core import TrainSettings, train
from realm.training.openqa_setup import (dev_metrics, evaluate_dev, prepare_qa_stage,
                                         prepare_retrieval)
from realm.training.rag import run_rag
from realm.training.positives import Positives, find_positives, positive_windows
from realm.training.prepare import prepare_qa_reader
from realm.hub import truncated_encoder

logger = logging.getLogger(__name__)


class OpenQATask:
    """The training core's task: span-marginal loss on training questions, EM on dev ones.

    For the first ``positive_steps`` steps each question is read beside its positive block
    (a window of ``window`` body word pieces around the answer) and its negatives, with a
    uniform p(z|x), as DPR's reader trains; then over the top k retrieved blocks.
    """

    def __init__(self, dataset: QADataset, dev: Sequence[QAExample], unwrap, recall_ks,
                 batch_size: int, bf16: bool, positives: Optional[Positives] = None,
                 positive_steps: int = 0, window: Optional[int] = None, seed: int = 0):
        self.dataset, self.dev, self.unwrap = dataset, list(dev), unwrap
        self.recall_ks, self.batch_size, self.bf16 = recall_ks, batch_size, bf16
        if positive_steps and positives is None:
            raise ValueError("positive_steps > 0 needs the positive blocks")
        self.positives, self.positive_steps, self.window = positives, positive_steps, window
        self.seed, self.step = seed, 0

    def before_step(self, step: int) -> None:  # a hook of the training core
        self.step = step

    def train_dataset(self) -> QADataset:
        return self.dataset

    def collate(self, items) -> QABatch:
        return collate_qa(items)

    def loss(self, model: nn.Module, batch: QABatch) -> tuple[torch.Tensor, dict[str, float]]:
        warm_up = self.step < self.positive_steps
        if warm_up:
            # the same blocks and windows whenever this step is replayed (resume)
            rng = np.random.default_rng([self.seed, self.step, batch.indices[0]])
            ids, windows = positive_windows(self.positives, batch.indices,
                                            self.unwrap(model).store, self.window, rng)
            out = model(batch, ids, torch.zeros(ids.shape), windows=windows)
        else:
            out = model(batch)
        with torch.no_grad():
            p_z = torch.softmax(self.unwrap(model).prior_logits(out), dim=-1)  # [B, k]
            block_has = out.answer_mask.flatten(2).any(dim=-1).float()  # [B, k]
            metrics = {"answerable": float(out.has_answer.float().mean()),
                       "p_answer_blocks": float((p_z * block_has).sum(-1).mean()),
                       "positive_warm_up": float(warm_up)}
        return out.loss, metrics

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return dev_metrics(self.unwrap(model), self.dev, self.recall_ks, self.batch_size,
                           self.bf16)


def span_reader_dir(path: str) -> Optional[str]:
    """The fine-tuned span reader that ``path`` names, if any: a reader directory, an Open-QA
    model directory (its ``reader/``) or an Open-QA run directory (its ``model/reader/``)."""
    for candidate in (path, os.path.join(path, "reader"), os.path.join(path, "model", "reader")):
        manifest = os.path.join(candidate, "manifest.json")
        if os.path.isfile(manifest):
            with open(manifest, encoding="utf-8") as f:
                if json.load(f).get("kind") == READER_KIND:
                    return candidate
    return None


def run_finetune(config, progress: bool = True) -> dict[str, Any]:
    """Open-QA fine-tuning with the shared core, then the dev evaluation; returns the summary.

    ``openqa.reader_type: generative`` runs the RAG branch (:func:`realm.training.rag.run_rag`).
    """
    if config.openqa.reader_type == "generative":
        return run_rag(config, progress)
    t0 = time.time()
    o, t = config.openqa, config.train
    corpus_dir, store, train_qa, dev_qa, accelerator, precision = prepare_qa_stage(
        config, o, "openqa", progress)

    trained = prepare_qa_reader(config) or span_reader_dir(o.reader)
    if trained:  # a fine-tuned reader, span scorer and all
        reader = SpanReader.from_pretrained(trained)
        if (reader.scorer_kind, reader.max_span_tokens) != (o.span_scorer, o.max_span_tokens):
            raise ValueError(
                f"openqa.reader: {trained} reads with span_scorer={reader.scorer_kind}, "
                f"max_span_tokens={reader.max_span_tokens}; this config asks for "
                f"{o.span_scorer}, {o.max_span_tokens}")
    else:
        reader_source = o.reader
        if not os.path.isdir(o.reader) or os.path.isfile(os.path.join(o.reader, "config.json")):
            # a checkpoint (not a saved encoder or a run directory): maybe cut to its first layers
            reader_source = truncated_encoder(o.reader, o.reader_layers, config.cache_dir)
        reader = SpanReader.from_checkpoint(reader_source, o.max_span_tokens, o.span_hidden,
                                            scorer=o.span_scorer, seed=config.seed)
    check_tokenizer(reader.tokenizer, store)
    retriever, index, retriever_dir = prepare_retrieval(config, corpus_dir, store, accelerator,
                                                         progress)
    model = OpenQAModel(retriever, reader, index, store, reader.tokenizer, k=o.k,
                        max_question_tokens=o.max_question_tokens,
                        max_joined_tokens=o.max_joined_tokens, regex=o.regex,
                        train_query_encoder=o.train_query_encoder,
                        normalization=o.normalization,
                        retrieval_temperature=o.retrieval_temperature)
    dataset = QADataset(train_qa, reader.tokenizer, o.max_question_tokens, o.regex)
    # DPR's reader data: each question's best-ranked block with an answer and blocks without;
    # a question with no answer in its top blocks teaches nothing and is left out
    positives = find_positives(model, dataset, max(o.positive_search, o.k), o.positive_negatives,
                               progress=progress and accelerator.is_main_process)
    keep = np.flatnonzero(positives.positive >= 0)
    logger.info("%d of %d training questions have an answer in their top %d blocks; the "
                "others are left out", len(keep), len(dataset), max(o.positive_search, o.k))
    if not len(keep):
        raise ValueError(f"openqa.train_qa: no training question of {o.train_qa} has an answer "
                         f"in its top {max(o.positive_search, o.k)} blocks")
    dataset = QADataset([train_qa[i] for i in keep], reader.tokenizer, o.max_question_tokens,
                        o.regex)
    dev_during = dev_qa[: o.eval_limit] if o.eval_limit else dev_qa
    task = OpenQATask(dataset, dev_during, accelerator.unwrap_model, o.recall_ks,
                      o.eval_batch_size, precision == "bf16", positives.subset(keep),
                      min(o.positive_steps, t.steps), o.positive_window, config.seed)
    if accelerator.is_main_process:
        save_config(config, t.run_dir)
    tracker = Tracker.from_config(config, enabled=accelerator.is_main_process)
    settings = TrainSettings.from_config(config, progress)
    report: dict[str, Any] = {}
    world_size = accelerator.num_processes
    try:
        result = train(model, task, settings, accelerator, tracker, hooks=[task],
                       config_dict=config.to_dict())
        unwrapped = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            save_openqa_model(unwrapped, os.path.join(t.run_dir, "model"), {
                "k": o.k, "max_question_tokens": o.max_question_tokens,
                "max_joined_tokens": o.max_joined_tokens, "regex": o.regex,
                "normalization": o.normalization,
                "retrieval_temperature": o.retrieval_temperature,
                "retriever_source": o.retriever, "reader_source": trained or o.reader,
            }, metadata={"stage": "finetune_openqa", "steps": result["steps"],
                         "train_qa": o.train_qa, "dev_qa": o.dev_qa})
            if dev_qa:
                report = evaluate_dev(unwrapped, dev_qa, o.recall_ks, o.eval_batch_size,
                                      precision == "bf16", tracker, t.run_dir, result["steps"],
                                      progress, dataset=o.dev_qa)
        accelerator.wait_for_everyone()
    finally:
        tracker.close()
        del model, task
        shutdown(accelerator)
    return {
        "stage": "finetune_openqa", "reader_type": "extractive", "run_dir": t.run_dir,
        "retriever": o.retriever,
        "retriever_dir": retriever_dir,
        "reader": trained or o.reader, "steps": result["steps"],
        "final_loss": round(result["final_loss"], 5) if np.isfinite(result["final_loss"]) else None,
        "train_questions": len(train_qa), "train_questions_with_positive": int(len(keep)),
        "positive_steps": min(o.positive_steps, t.steps), "examples_per_s": result["examples_per_s"],
        "precision": precision or "fp32", "world_size": world_size,
        "dev": report, "model": os.path.join(t.run_dir, "model"),
        "seconds": round(time.time() - t0, 1),
    }
