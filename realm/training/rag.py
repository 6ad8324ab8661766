"""Generative Open-QA fine-tuning (RAG, Lewis et al. 2020): the task and the stage's
``openqa.reader_type: generative`` branch.

The document index stays fixed (the retriever resolved as for the extractive reader,
:func:`realm.training.openqa_setup.prepare_retrieval`); the query encoder and the generator
(``openqa.generator_mode``: frozen, lora or full) train on the RAG-Sequence or RAG-Token loss over
the top k blocks (:class:`realm.modeling.rag.GenerativeOpenQAModel`) with the shared training
core. ``train.steps=0`` trains nothing: zero-shot RAG, the instruct model prompted over the
retrieved blocks; ``openqa.closed_book`` drops retrieval (the baseline); ``openqa.refresh_index``
trains the document encoder too, its index kept fresh by the refresher (RAG-end2end:
:func:`start_refresh`, :func:`final_index`). The run writes
``model/`` (``generator/``, ``retriever/`` and the document embeddings), the dev predictions and
a summary with the extractive stage's keys.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from realm.config import save_config
from realm.data.qa import QAExample
from realm.errors import ConfigError
from realm.modeling.rag import GenerativeOpenQAModel, RAGGenerator
from realm.modeling.readers.lora import LoraSettings
from realm.index.mips import check_factory
from realm.precision import cpu_threads
from realm.refresh.hook import RefreshHook
from realm.refresh.rundir import RunStore
from realm.refresh.supervisor import check_devices
from realm.retrieval.fixed import (LiveIndex, dense_index, document_embeddings,
                                   save_openqa_model, with_bm25)
from realm.tracking import Tracker
from realm.training.accelerator import shutdown
from realm.training.checkpoint import checkpoints
from realm.training.core import TrainSettings, train
from realm.training.openqa_setup import (dev_metrics, evaluate_dev, prepare_qa_stage,
                                         prepare_retrieval)
from realm.training.positives import generative_positives

logger = logging.getLogger(__name__)


class RAGTask:
    """The training core's task: the RAG loss on training questions, EM on dev ones.

    For the first ``positive_steps`` steps (``openqa.positive_steps``) each question is read
    beside one block alone, its warm-up block (:func:`realm.training.positives.
    generative_positives`: the best-ranked block holding an answer), with p(z|x) = 1: the
    generator learns to read at a third of the cost of a step over k = 3; then over the top k.
    """

    def __init__(self, examples: Sequence[QAExample], dev: Sequence[QAExample], unwrap,
                 recall_ks: Sequence[int], batch_size: int, bf16: bool,
                 warm_up_blocks: Optional[np.ndarray] = None, positive_steps: int = 0):
        self.examples, self.dev, self.unwrap = list(examples), list(dev), unwrap
        self.recall_ks, self.batch_size, self.bf16 = list(recall_ks), batch_size, bf16
        if positive_steps and (warm_up_blocks is None or len(warm_up_blocks) != len(examples)):
            raise ValueError("positive_steps > 0 needs a warm-up block for every question")
        self.warm_up_blocks, self.positive_steps, self.step = warm_up_blocks, positive_steps, 0

    def before_step(self, step: int) -> None:  # a hook of the training core
        self.step = step

    def train_dataset(self) -> list[tuple[int, QAExample]]:
        return list(enumerate(self.examples))

    def collate(self, items: list[tuple[int, QAExample]]) -> tuple[list[int], list[QAExample]]:
        return [i for i, _ in items], [ex for _, ex in items]

    def loss(self, model: nn.Module, batch: tuple[list[int], list[QAExample]]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        indices, examples = batch
        questions, answers = [ex.question for ex in examples], [ex.answers for ex in examples]
        warm_up = self.step < self.positive_steps
        if warm_up:
            ids = self.warm_up_blocks[np.asarray(indices)][:, None]  # [B, 1]
            # p(z|x) = 1 over the one block (its f(x, z) scored, so every rank's query encoder
            # takes part in the step, with a zero gradient)
            out = model(questions, answers, block_ids=ids)
        else:
            out = model(questions, answers)
        with torch.no_grad():
            p_z = torch.softmax(self.unwrap(model).prior_logits(out.retrieval_logits), dim=-1)
            block_has = out.has_answer.float().to(p_z.device)  # [B, k]
            metrics = {"answerable": float(block_has.any(dim=-1).float().mean()),
                       "p_answer_blocks": float((p_z * block_has).sum(-1).mean()),
                       "answers_scored": float(out.answer_mask.sum(1).float().mean()),
                       "positive_warm_up": float(warm_up)}
        return out.loss, metrics

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return dev_metrics(self.unwrap(model), self.dev, self.recall_ks, self.batch_size,
                           self.bf16)


def build_generator(config, bf16: bool) -> RAGGenerator:
    """``openqa.generator`` in ``openqa.generator_mode`` (a LoRA adapter of the configured shape
    in ``lora``), its rows at most ``openqa.max_generator_tokens``."""
    o = config.openqa
    lora = (LoraSettings(o.generator_lora_rank, o.generator_lora_alpha)
            if o.generator_mode == "lora" else None)
    torch.manual_seed(config.seed)  # the adapter's initialisation
    return RAGGenerator.from_checkpoint(o.generator, mode=o.generator_mode,
                                        max_length=o.max_generator_tokens,
                                        precision="bf16" if bf16 else "fp32", lora=lora)


def start_refresh(config, accelerator, model, store, index) -> RefreshHook:
    """``openqa.refresh_index`` (RAG-end2end): the refresh hook over ``train.run_dir`` (encoder
    snapshots every ``refresh.every_steps``, the refresher, hot swaps), generation 0 committed
    from the fixed index's embeddings (no wait for the refresher), and the model's index made
    a :class:`LiveIndex` over the generation in use (BM25's blocks beside it where the fixed
    index read them)."""
    r = config.retriever
    hook = RefreshHook.from_config(
        config, accelerator, model, lambda m: accelerator.unwrap_model(m).retriever,
        corpus_fingerprint=store.fingerprint, dim=model.retriever.dim,
        cpu_threads=cpu_threads(config.train.threads), stage="finetune_openqa")
    run_store = RunStore(config.train.run_dir)
    if (accelerator.is_main_process and config.index.factory == "Flat"
            and not checkpoints(config.train.run_dir) and run_store.read_latest() is None):
        run_store.commit_generation(index.embeddings.numpy(), encoder_step=0,
                                    corpus_fingerprint=store.fingerprint, factory="Flat",
                                    extra={"seeded_from": "the fixed index"},
                                    shard_blocks=config.index.shard_blocks)
    accelerator.wait_for_everyone()
    live = LiveIndex(hook.searcher(accelerator), model.retriever, store, r.max_block_tokens)
    model.index = with_bm25(live, store, getattr(index, "bm25_blocks", 0))
    return hook


def final_index(config, model, store, progress: bool) -> None:
    """After RAG-end2end: the model's index made the corpus embedded by the trained document
    encoder (what the saved model and the dev evaluation read)."""
    r = config.retriever
    embeddings = document_embeddings(model.retriever, store, r.max_block_tokens,
                                     progress=progress, precision=config.refresh.precision)
    model.index = dense_index(embeddings, store, getattr(model.index, "bm25_blocks", 0))


def run_rag(config, progress: bool = True) -> dict[str, Any]:
    """Generative Open-QA fine-tuning with the shared core (none at ``train.steps=0``), then the
    dev evaluation; returns the summary (the extractive stage's keys, plus the generator's)."""
    t0 = time.time()
    o, t = config.openqa, config.train
    if t.steps and o.regex:
        raise ConfigError("openqa.regex: the generative reader trains on answer strings, not "
                          "regular expressions (evaluate a model on a regex QA file with "
                          "launch/evaluate.py openqa --regex, or train.steps=0)")
    if t.steps and o.generator_mode == "frozen" and (
            o.closed_book or o.retriever == "bm25" or not o.train_query_encoder):
        what = ("closed_book" if o.closed_book else "retriever=bm25" if o.retriever == "bm25"
                else "train_query_encoder=false")
        raise ConfigError(f"openqa.generator_mode: a frozen generator with {what} leaves nothing "
                          f"to train; use lora or full, or train.steps=0 (zero-shot RAG)")
    if t.steps and o.positive_steps and o.closed_book:
        raise ConfigError("openqa.positive_steps: closed book reads no block; set it to 0")
    if o.refresh_index:
        if config.index.sharding == "ranks":  # (the dev evaluation searches on one process)
            raise ConfigError("index.sharding: openqa.refresh_index reads a whole index on "
                              "every process; use index.sharding=replicated")
        check_devices(config.refresh.devices)
        check_factory(config.index.factory, config.retriever.dim)
    corpus_dir, store, train_qa, dev_qa, accelerator, precision = prepare_qa_stage(
        config, o, "openqa", progress, require_train=t.steps > 0)
    if o.refresh_index:  # (the refresher reads the saved config: the corpus, resolved)
        config = dataclasses.replace(config, corpus=corpus_dir)
    bf16 = precision == "bf16"
    retriever, index, retriever_dir = (None, None, None) if o.closed_book else \
        prepare_retrieval(config, corpus_dir, store, accelerator, progress)
    generator = build_generator(config, bf16)
    model = GenerativeOpenQAModel(
        retriever, generator, index, store, k=o.k, max_question_tokens=o.max_question_tokens,
        rag_loss=o.rag_loss, decoding=o.decoding, beam_size=o.beam_size,
        max_answer_tokens=o.max_answer_tokens, max_train_answers=o.max_train_answers,
        closed_book=o.closed_book, train_query_encoder=o.train_query_encoder,
        train_doc_encoder=o.refresh_index, retrieval_temperature=o.retrieval_temperature,
        regex=o.regex)
    positive_steps = min(o.positive_steps, t.steps)
    warm_up_blocks, with_positive = None, None
    if positive_steps:  # the generator's warm-up: each question beside its answer's block
        warm_up_blocks, found = generative_positives(
            model, train_qa, max(o.positive_search, o.k),
            progress=progress and accelerator.is_main_process)
        with_positive = int(found.sum())
        logger.info("positive warm-up (%d steps): %d of %d training questions have an answer in "
                    "their top %d blocks (the others read their top block)", positive_steps,
                    with_positive, len(train_qa), max(o.positive_search, o.k))
    dev_during = dev_qa[: o.eval_limit] if o.eval_limit else dev_qa
    task = RAGTask(train_qa, dev_during, accelerator.unwrap_model, o.recall_ks,
                   o.eval_batch_size, bf16, warm_up_blocks, positive_steps)
    if accelerator.is_main_process:
        save_config(config, t.run_dir)
    accelerator.wait_for_everyone()
    hook = start_refresh(config, accelerator, model, store, index) if (
        o.refresh_index and t.steps) else None
    tracker = Tracker.from_config(config, enabled=accelerator.is_main_process)
    settings = TrainSettings.from_config(config, progress,
                                         lr_scales={"generator.": o.generator_lr_scale})
    report: dict[str, Any] = {}
    finished = False
    try:
        if t.steps:
            result = train(model, task, settings, accelerator, tracker,
                           hooks=[task, hook] if hook else [task], config_dict=config.to_dict())
        else:  # zero-shot RAG: nothing trains
            logger.info("train.steps=0: zero-shot RAG, %s read as it is", o.generator)
            result = {"steps": 0, "final_loss": math.nan, "examples_per_s": 0.0}
        finished = True
        if hook is not None:
            hook.close(finished=True)
            final_index(config, accelerator.unwrap_model(model), store, progress)
        unwrapped = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            save_openqa_model(unwrapped, os.path.join(t.run_dir, "model"), {
                "k": o.k, "max_question_tokens": o.max_question_tokens, "regex": o.regex,
                "retrieval_temperature": o.retrieval_temperature, "rag_loss": o.rag_loss,
                "decoding": o.decoding, "beam_size": o.beam_size,
                "max_answer_tokens": o.max_answer_tokens,
                "max_generator_tokens": o.max_generator_tokens,
                "max_train_answers": o.max_train_answers, "generator_mode": o.generator_mode,
                "retriever_source": None if o.closed_book else o.retriever,
                "generator_source": o.generator,
            }, metadata={"stage": "finetune_openqa", "steps": result["steps"],
                         "train_qa": o.train_qa, "dev_qa": o.dev_qa})
            if dev_qa:
                report = evaluate_dev(unwrapped, dev_qa, o.recall_ks, o.eval_batch_size, bf16,
                                      tracker, t.run_dir, result["steps"], progress,
                                      dataset=o.dev_qa)
        accelerator.wait_for_everyone()
        world_size = accelerator.num_processes
    finally:
        if hook is not None and not finished:
            hook.close(finished=False)
        tracker.close()
        del model, task
        shutdown(accelerator)
    return {
        "stage": "finetune_openqa", "reader_type": "generative", "run_dir": t.run_dir,
        "retriever": None if o.closed_book else o.retriever, "retriever_dir": retriever_dir,
        "reader": o.generator, "generator_mode": o.generator_mode, "rag_loss": o.rag_loss,
        "decoding": o.decoding, "closed_book": o.closed_book, "steps": result["steps"],
        "refresh_index": o.refresh_index,
        "generations_swapped": len(hook.generations_used) if hook else 0,
        "max_staleness_steps": hook.max_staleness_steps if hook else 0,
        "final_loss": (round(result["final_loss"], 5) if math.isfinite(result["final_loss"])
                       else None),
        "train_questions": len(train_qa), "train_questions_with_positive": with_positive,
        "positive_steps": positive_steps, "examples_per_s": result["examples_per_s"],
        "precision": precision or "fp32", "world_size": world_size,
        "dev": report, "model": os.path.join(t.run_dir, "model"),
        "seconds": round(time.time() - t0, 1),
    }
