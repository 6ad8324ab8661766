"""Cached preparation: every stage that needs a corpus, a truncated or MLM-adapted encoder or an
ICT warm start asks this module, and each is built once into ``cache_dir`` under a key made of
everything that changes the result.

Stages that train (the ICT warm start, the MLM adaptation) run as their own processes, so that
their accelerate state and threads are gone before the caller's stage starts. Each output
appears only when complete (its ``manifest.json`` or ``config.json`` is written last, or the
directory is renamed into place); other ranks wait for it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

from realm.cache import build_once, cache_path, content_key, is_main, wait_for
from realm.config import load_config, override, save_config
from realm.data.build import build_corpus, corpus_cache_dir
from realm.errors import ConfigError, StageFailed
from realm.hub import has_trained_mlm_head, truncated_encoder
from realm.refresh.supervisor import child_env

logger = logging.getLogger(__name__)


def prepare_corpus(config, progress: bool = True) -> str:
    """``corpus``, or the ``data`` section's corpus built once into ``cache_dir``."""
    if config.corpus:
        return config.corpus
    if not config.data.input:
        raise ConfigError("corpus: no corpus directory given and data.input is empty (set "
                          "corpus=DIR, a launch/prepare_corpus.py output, or data.input=FILE)")
    out = corpus_cache_dir(config.cache_dir, config.data, config.spans)
    # not build_once: build_corpus runs every time, since it also checks that a built corpus
    # still matches its input file (the key names the input's path, not its content)
    if is_main():
        if not os.path.exists(os.path.join(out, "manifest.json")):
            logger.info("building the knowledge corpus from %s into %s", config.data.input, out)
        build_corpus(config.data, config.spans, out, progress=progress)  # a no-op when built
    wait_for(os.path.join(out, "manifest.json"), "the corpus")
    return out


def prepare_encoder(config) -> str:
    """``pretrain.encoder``, or a copy of it cut to its first ``encoder_layers`` layers (cached)."""
    p = config.pretrain
    return truncated_encoder(p.encoder, p.encoder_layers, config.cache_dir)


#: seconds between the progress lines of a warm start running in its own process
HEARTBEAT_S = 30.0


def _last_step(run_dir: Optional[str]) -> Optional[int]:
    """The step of the newest record in ``run_dir/metrics.jsonl`` (None before the first)."""
    path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
    if not path or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        for line in reversed(f.read().splitlines()):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line, or the tail of a longer one
    return None


def heartbeat_line(what: str, elapsed: float, step: Optional[int], steps: Optional[int],
                   first: Optional[tuple[float, int]]) -> str:
    """``the ICT warm start: step 120 / 1000 (13%), 2.10 steps/s, about 7 min left`` (the rate
    from the first step seen, so that loading time does not count)."""
    if step is None:
        return f"{what}: running for {elapsed:.0f} s (no training step yet)"
    line = f"{what}: step {step}" + (f" / {steps} ({100 * step / steps:.0f}%)" if steps else "")
    if first is not None and step > first[1] and elapsed > first[0]:
        rate = (step - first[1]) / (elapsed - first[0])
        line += f", {rate:.2f} steps/s"
        if steps:
            left = (steps - step) / rate
            line += f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"
    return line


def _run_warm_start(cmd: list[str], what: str, run_dir: Optional[str] = None,
                    steps: Optional[int] = None, heartbeat_s: Optional[float] = None) -> None:
    """Run a warm-start stage as its own process; its last stdout line (the summary) is logged.

    While it runs, a progress line every ``heartbeat_s`` seconds (step, rate and time left, read
    from the stage's ``run_dir/metrics.jsonl``), so a long warm start never looks hung.
    """
    heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=err)
        t0, first = time.monotonic(), None
        try:
            while True:
                try:
                    proc.wait(timeout=heartbeat_s)
                    break
                except subprocess.TimeoutExpired:
                    elapsed, step = time.monotonic() - t0, _last_step(run_dir)
                    if step is not None and first is None:
                        first = (elapsed, step)
                    logger.info("%s", heartbeat_line(what, elapsed, step, steps, first))
        except BaseException:  # Ctrl-C or an error here: the child does not outlive us
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        logger.debug("%s: command %s; its stderr:\n%s", what, " ".join(cmd), stderr[-3000:])
        # its one-line error (PROG: error: MESSAGE), or a logged ERROR line
        errors = [line.split(": error: ", 1)[1] if ": error: " in line
                  else line.split(" ERROR ", 1)[1] for line in stderr.splitlines()
                  if ": error: " in line or " ERROR " in line]
        # the stage's own one-line error when it gave one, else the end of its output
        why = errors[-1] if errors else f"command {' '.join(cmd)}:\n{stderr[-3000:]}"
        raise StageFailed(f"{what} failed (exit {proc.returncode}): {why}")
    lines = stdout.strip().splitlines()
    logger.info("%s: %s", what, lines[-1] if lines else "done")


def _warm_start_train(train, run_dir: str, steps: int, batch_size: int, lr: float,
                      saves: int):
    """The ``train`` section of a warm start run as its own stage: ``steps`` at ``lr`` (a tenth
    of them warm-up), one micro-batch a step, no evaluation, ``saves`` checkpoints."""
    return dataclasses.replace(train, run_dir=run_dir, steps=steps, batch_size=batch_size,
                               lr=lr, grad_accum=1, warmup_steps=max(1, steps // 10),
                               eval_every=0, save_every=max(1, steps // saves))


def _spawn_stage(stage: str, config, run_dir: str, what: str) -> None:
    """Run ``python -m realm STAGE`` on ``config`` (wandb off), saved beside ``run_dir`` in the
    cache, as its own process (:func:`_run_warm_start`)."""
    config = dataclasses.replace(config, logging=dataclasses.replace(config.logging, wandb=False))
    path = save_config(config, config.cache_dir, f"{os.path.basename(run_dir)}.yaml")
    _run_warm_start([sys.executable, "-m", "realm", stage, "--no-progress", "--config", path],
                    what, run_dir=run_dir, steps=config.train.steps)


def prepare_retriever(config, corpus: str, encoder: str) -> str:
    """``pretrain.retriever``, or an ICT warm start of ``encoder`` on ``corpus`` (cached).

    The warm start runs as its own process (``python -m realm ict``), so that its
    accelerate state and threads are gone before pretraining starts.
    """
    p, r = config.pretrain, config.retriever
    if p.retriever:
        return p.retriever
    run_dir = cache_path(config.cache_dir, "ict", [
        content_key(corpus), encoder, r.dim, r.pooling, r.max_query_tokens,
        r.max_block_tokens, p.ict_steps, p.ict_batch_size, p.ict_lr, config.seed])
    out = os.path.join(run_dir, "retriever")

    def build() -> None:
        logger.info("no retriever given: ICT warm start (%d steps) into %s", p.ict_steps, run_dir)
        cmd = [sys.executable, "-m", "realm", "ict", "--no-progress",
               override("corpus", corpus), override("cache_dir", config.cache_dir),
               override("retriever.encoder", encoder),
               f"retriever.dim={r.dim}", f"retriever.pooling={r.pooling}",
               f"retriever.max_query_tokens={r.max_query_tokens}",
               f"retriever.max_block_tokens={r.max_block_tokens}",
               f"train.steps={p.ict_steps}", f"train.batch_size={p.ict_batch_size}",
               f"train.warmup_steps={max(1, p.ict_steps // 10)}", f"train.lr={p.ict_lr}",
               f"train.precision={config.train.precision}", "train.eval_every=0",
               f"train.save_every={p.ict_steps}", override("train.run_dir", run_dir),
               f"seed={config.seed}", "ict.holdout_blocks=0", "logging.log_every=10",
               "logging.wandb=false"]
        _run_warm_start(cmd, "the ICT warm start", run_dir=run_dir, steps=p.ict_steps)

    build_once(os.path.join(out, "manifest.json"), build, "the warm-started retriever")
    return out


def dpr_cache_dir(config, corpus: str) -> str:
    """Where :func:`prepare_dpr_retriever` keeps its run: keyed by the corpus's fingerprint, the
    training questions' content and everything that changes the training."""
    o, d, r = config.openqa, config.retriever_training, config.retriever
    return cache_path(config.cache_dir, "dpr", [
        "dpr", content_key(corpus), content_key(d.train_qa or o.train_qa),
        content_key(r.encoder), r.dim, r.pooling, r.max_query_tokens, r.max_block_tokens,
        d.positive_search, d.hard_negatives, o.regex, o.dpr_steps, o.dpr_batch_size, o.dpr_lr,
        config.train.precision, config.seed])


def prepare_dpr_retriever(config, corpus: str) -> str:
    """A DPR retriever (:mod:`realm.training.dpr`) trained on ``openqa.train_qa`` over
    ``corpus`` (cached): what ``openqa.retriever: dpr`` reads.

    The ``retriever`` section gives the encoders, ``retriever_training`` the mining, and
    ``openqa.dpr_steps``/``dpr_batch_size``/``dpr_lr`` the training; no dev evaluation (the
    Open-QA run reports answer recall with it). Runs as its own process; a killed run resumes from
    its checkpoint when asked again.
    """
    o, d = config.openqa, config.retriever_training
    train_qa = d.train_qa or o.train_qa
    run_dir = dpr_cache_dir(config, corpus)
    out = os.path.join(run_dir, "retriever")

    def build() -> None:
        steps = o.dpr_steps
        dpr = dataclasses.replace(
            config, corpus=corpus,
            retriever_training=dataclasses.replace(d, train_qa=train_qa, dev_qa=None,
                                                   regex=o.regex, evaluate_before=False),
            train=_warm_start_train(config.train, run_dir, steps, o.dpr_batch_size, o.dpr_lr,
                                    saves=3))
        logger.info("openqa.retriever=dpr: training a DPR retriever (%d steps) into %s", steps,
                    run_dir)
        _spawn_stage("train_retriever", dpr, run_dir, "the DPR retriever")

    build_once(os.path.join(out, "manifest.json"), build, "the DPR retriever")
    return out


def prepare_qa_reader(config) -> Optional[str]:
    """The span reader that ``openqa.reader_warm_start`` (an Open-QA config, e.g.
    ``configs/openqa_squad.yaml``) fine-tunes, cached in ``cache_dir``; None when no warm
    start is asked for.

    The warm start is that config's own fine-tune as it stands (its corpus, questions, retriever,
    steps and seed), without its dev evaluation and without wandb, in its own process; a killed
    run resumes from its checkpoint when asked again. Its key is the whole resolved config.
    """
    source = config.openqa.reader_warm_start
    if not source:
        return None
    warm = load_config(source)
    if warm.openqa.reader_warm_start:
        raise ValueError(f"openqa.reader_warm_start: {source} asks for a warm start of its own; "
                         f"chained warm starts are not supported")
    cache_dir = config.cache_dir
    run_dir = cache_path(cache_dir, "qa-reader", ["qa-reader", warm.to_dict()])
    out = os.path.join(run_dir, "model", "reader")

    def build() -> None:
        fine_tune = dataclasses.replace(
            warm, cache_dir=cache_dir, openqa=dataclasses.replace(warm.openqa, dev_qa=None),
            train=dataclasses.replace(warm.train, run_dir=run_dir))
        logger.info("openqa.reader_warm_start: fine-tuning a reader with %s (%d steps) into %s",
                    source, fine_tune.train.steps, run_dir)
        _spawn_stage("finetune_openqa", fine_tune, run_dir, "the reader's warm start")

    build_once(os.path.join(out, "manifest.json"), build, "the warm-started reader")
    return out


def prepare_adapted_encoder(config, corpus: str, encoder: str) -> str:
    """``encoder`` when it has a trained masked-LM head (or ``pretrain.mlm_steps`` is 0), else
    its MLM adaptation on ``corpus`` (:mod:`realm.training.adapt_mlm`), cached in
    ``cache_dir`` under a key of everything that changes the result.

    The adaptation runs as its own process; its output directory appears only when complete, and
    a killed adaptation resumes from its checkpoint when asked again.
    """
    p = config.pretrain
    if not p.mlm_steps or has_trained_mlm_head(encoder):
        return encoder
    m = config.mlm
    steps = p.mlm_steps
    run_dir = cache_path(config.cache_dir, "mlm", [
        "adapt-mlm", content_key(encoder), content_key(corpus), steps, p.mlm_batch_size,
        p.mlm_lr, m.mask_prob, m.salient_span_prob, m.neighbour_prob, m.random_prob, m.max_tokens,
        m.holdout_blocks, *(["copy-head-2"] if m.copy_head else []),
        config.train.precision, config.seed])
    out = os.path.join(run_dir, "encoder")

    def build() -> None:
        adapt = dataclasses.replace(
            config, corpus=corpus,
            mlm=dataclasses.replace(m, encoder=encoder, encoder_layers=None),
            train=_warm_start_train(config.train, run_dir, steps, p.mlm_batch_size, p.mlm_lr,
                                    saves=4))
        logger.info("%s has no trained masked-LM head: MLM adaptation (%d steps) into %s",
                    encoder, steps, run_dir)
        _spawn_stage("adapt_mlm", adapt, run_dir, "the MLM adaptation")

    build_once(os.path.join(out, "manifest.json"), build, "the MLM-adapted encoder")
    return out
