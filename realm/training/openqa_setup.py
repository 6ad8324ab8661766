"""What both Open-QA readers (extractive and generative) share in the fine-tuning stage: the
corpus, questions and accelerator (:func:`prepare_qa_stage`), the retriever that
``openqa.retriever`` names over its fixed index (:func:`prepare_retrieval`), and the dev
evaluation at the end with its predictions and logged figures (:func:`evaluate_dev`).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from realm.artifacts import record_evaluation
from realm.cache import digest
from realm.data.qa import QAExample, read_qa
from realm.data.store import BlockStore, check_tokenizer
from realm.evaluate.openqa import evaluate_openqa, write_predictions
from realm.fsutil import sha256_file
from realm.hub import run_part
from realm.modeling.retriever import Retriever, load_retriever
from realm.retrieval.fixed import BM25Index, dense_index, document_embeddings
from realm.tracking import Tracker
from realm.training.accelerator import make_accelerator
from realm.training.ict import parameters_sha256
from realm.training.prepare import prepare_corpus, prepare_dpr_retriever


def prepare_qa_stage(config, section, name: str, progress: bool = True,
                     require_train: bool = True):
    """What a stage that trains on questions starts from: the corpus (``corpus``, or the
    ``data`` section's built into ``cache_dir``), the training and dev questions, and
    the accelerator (seeded). A section with ``triplets`` may have no ``train_qa``; so may a
    stage that does not train (``require_train=False``: zero-shot RAG).

    Returns:
        ``(corpus_dir, store, train_qa, dev_qa, accelerator, precision)``.
    """
    if require_train and not section.train_qa and not getattr(section, "triplets", None):
        raise ValueError(f"{name}.train_qa: no training questions given")
    # the questions first: a malformed line is an error before anything is built or written
    train_qa = read_qa(section.train_qa, regex=section.regex) if section.train_qa else []
    dev_qa = read_qa(section.dev_qa, regex=section.regex) if section.dev_qa else []
    corpus_dir = prepare_corpus(config, progress)
    store = BlockStore(corpus_dir)
    t = config.train
    accelerator, precision = make_accelerator(t, config.seed)
    return corpus_dir, store, train_qa, dev_qa, accelerator, precision


def prepare_retrieval(config, corpus_dir: str, store: BlockStore, accelerator,
                      progress: bool = True) -> tuple[Optional[Retriever], Any, Optional[str]]:
    """The retriever that ``openqa.retriever`` names and its fixed index over ``store``.

    ``bm25``: BM25, no retriever. ``dpr``: a DPR retriever trained first (cached,
    :func:`realm.training.prepare.prepare_dpr_retriever`). A retriever directory or a run
    directory holding one (``retriever/``): that retriever. A transformers checkpoint: a
    zero-shot retriever built as the ``retriever`` section says (its projection seeded). The
    document embeddings are computed once by the main process and cached in ``cache_dir``.

    Returns:
        ``(retriever, index, retriever_dir)``: the retriever (None for BM25), a
        :class:`DenseIndex` (a :class:`HybridIndex` with ``openqa.bm25_blocks``) or
        :class:`BM25Index`, and the retriever directory read (None for
        BM25 and zero-shot checkpoints).

    Raises:
        ValueError: A directory that is none of the known kinds (the message names it).
    """
    o, r = config.openqa, config.retriever
    if o.retriever == "bm25":
        return None, BM25Index(store), None
    retriever_dir = (prepare_dpr_retriever(config, corpus_dir) if o.retriever == "dpr"
                     else run_part(o.retriever, "retriever"))
    manifest = os.path.join(retriever_dir, "manifest.json")
    if os.path.isfile(manifest):
        retriever, source = Retriever.from_pretrained(retriever_dir), sha256_file(manifest)
    else:  # a transformers checkpoint: zero-shot, as the `retriever` section builds it
        if os.path.isdir(retriever_dir) and not os.path.isfile(
                os.path.join(retriever_dir, "config.json")):
            raise ValueError(f"openqa.retriever: {o.retriever} is neither a retriever "
                             f"directory, a run directory with a retriever/, nor a "
                             f"transformers checkpoint (no manifest.json, no config.json)")
        retriever = load_retriever(retriever_dir, r.dim, r.pooling, r.encoder_layers,
                                   config.cache_dir)
        # the projection is new (seeded), so the index is keyed on its values too: another
        # seed's cached index would not match this query encoder
        source, retriever_dir = ["zero-shot", o.retriever, r.dim, r.pooling, r.encoder_layers,
                                 parameters_sha256(retriever.doc_encoder.projection)], None
    check_tokenizer(retriever.tokenizer, store)
    retriever.max_block_tokens = r.max_block_tokens  # the fixed index is embedded at this length
    key = digest([source, store.fingerprint, r.max_block_tokens, config.refresh.precision])
    cache = os.path.join(config.cache_dir, f"openqa-index-{key}.npy")
    if accelerator.is_main_process:
        document_embeddings(retriever, store, r.max_block_tokens, cache, progress,
                            config.refresh.precision)
    accelerator.wait_for_everyone()
    embeddings = document_embeddings(retriever, store, r.max_block_tokens, cache, progress,
                                     config.refresh.precision)
    return retriever, dense_index(embeddings, store, o.bm25_blocks), retriever_dir


def evaluate_dev(model, dev_qa: list[QAExample], recall_ks: list[int], batch_size: int,
                 bf16: bool, tracker: Tracker, run_dir: str, step: int,
                 progress: bool = True, dataset: Optional[str] = None) -> dict[str, Any]:
    """The final dev evaluation of either kind of model: its report (EM, F1, answer recall@k,
    questions/s), ``run_dir/predictions-dev.jsonl``, the figures in the saved model's card and
    manifest (``run_dir/model``; ``dataset``: the questions' file), the ``final/`` figures and a
    table of the first 50 predictions logged at ``step``."""
    report, records = evaluate_openqa(model, dev_qa, recall_ks, batch_size, bf16, progress)
    write_predictions(records, os.path.join(run_dir, "predictions-dev.jsonl"))
    model_dir = os.path.join(run_dir, "model")
    if os.path.isfile(os.path.join(model_dir, "manifest.json")):
        record_evaluation(model_dir, {k: v for k, v in report.items() if k in (
            "exact_match", "f1") or k.startswith("answer_recall@")}, dataset, split="dev")
    tracker.log({f"final/{k}": v for k, v in report.items() if isinstance(v, (int, float))},
                step=step)
    tracker.log_table(  # a look at the answers in wandb
        "dev_predictions", ["question", "prediction", "gold", "exact_match", "answer_block",
                            "retrieved"],
        [[r["question"], r["prediction"], " | ".join(r["gold"]), r["exact_match"],
          r["answer_block"], " | ".join(f"{b['title']} ({b['score']})" for b in r["retrieved"])]
         for r in records[:50]], step=step)
    return report


def dev_metrics(model, dev: Sequence[QAExample], recall_ks: Sequence[int], batch_size: int,
                bf16: bool) -> dict[str, float]:
    """An Open-QA task's evaluation during training (either reader): the float fields of
    :func:`realm.evaluate.openqa.evaluate_openqa`'s report on ``dev``; none without ``dev``."""
    if not dev:
        return {}
    report, _ = evaluate_openqa(model, dev, recall_ks, batch_size, bf16, progress=False)
    return {k: v for k, v in report.items() if isinstance(v, float)}
