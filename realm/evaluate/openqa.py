"""Open-QA evaluation: exact match, F1 and answer recall@k of a fine-tuned model (extractive or
generative) on questions, with one prediction record per question (written as jsonl by
:func:`write_predictions`)."""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from realm.data.qa import QADataset, QAExample, collate_qa
from realm.fsutil import write_lines_atomic
from realm.metrics import exact_match, f1_score, has_answer, recall_at_k
from realm.modeling.modes import eval_mode
from realm.precision import autocast
from realm.modeling.openqa import OpenQAModel
from realm.modeling.rag import GenerativeOpenQAModel


@torch.no_grad()
def evaluate_openqa(model: OpenQAModel | GenerativeOpenQAModel, examples: Sequence[QAExample],
                    recall_ks: Sequence[int], batch_size: int = 16, bf16: bool = False,
                    progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """EM, F1 and answer recall@k of the retrieval, with one prediction record per question.

    The reader reads the top ``model.k`` blocks; recall is measured on the top ``max(recall_ks)``.
    Each record: ``question``, ``prediction``, ``gold``, ``exact_match``, ``f1``, ``retrieved``
    (the blocks read: ``title``, ``block``, ``score``; a generative model adds ``probability``,
    ``p(z|x, y)`` of its answer) and ``answer_block`` (the title of the block the answer came
    from; the generative model's most probable block given its answer).
    """
    if isinstance(model, GenerativeOpenQAModel):
        return _evaluate_generative(model, examples, recall_ks, batch_size, bf16, progress)
    t0 = time.perf_counter()
    with eval_mode(model):
        dataset = QADataset(examples, model.tokenizer, model.max_question_tokens, model.regex)
        k_read = model.k
        k_max = min(max(max(recall_ks), k_read), len(model.store))
        device = next(model.reader.parameters()).device
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
                    else torch.autocast(device.type, enabled=False))
        records, hits = [], []
        bar = tqdm(total=len(dataset), desc="evaluate", unit="q", disable=not progress,
                   mininterval=1.0)
        for lo in range(0, len(dataset), batch_size):
            batch = collate_qa([dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))])
            with autocast:
                logits, ids = model.retrieve(batch, k_max)
                out = model(batch, ids[:, :k_read], logits[:, :k_read], with_loss=False)
            for i, pred in enumerate(model.best_spans(out)):
                ex = examples[lo + i]
                texts = [model.store.text(int(b)) for b in ids[i]]
                hits.append([has_answer(t, ex.answers, regex=model.regex) for t in texts])
                records.append({
                    "question": ex.question, "prediction": pred["prediction"], "gold": ex.answers,
                    "exact_match": exact_match(pred["prediction"], ex.answers, regex=model.regex),
                    "f1": 0.0 if model.regex else f1_score(pred["prediction"], ex.answers),
                    "retrieved": [{"title": model.store.title(int(b)), "block": int(b),
                                   "score": round(float(s), 4)}
                                  for b, s in zip(ids[i][:k_read], logits[i][:k_read].tolist())],
                    "answer_block": model.store.title(pred["block"]),
                })
            bar.update(len(batch.questions))
        bar.close()
    return _report(records, hits, recall_ks, k_read, k_max, model.regex, t0), records


def _report(records: list[dict[str, Any]], hits: list[list[bool]], recall_ks: Sequence[int],
            k_read: int, k_max: int, regex: bool, t0: float) -> dict[str, Any]:
    """The report's figures: EM, F1, answer recall@k (None without retrieval), counts, time."""
    seconds = time.perf_counter() - t0
    report: dict[str, Any] = {
        "exact_match": round(float(np.mean([r["exact_match"] for r in records])), 4),
        "f1": None if regex else round(float(np.mean([r["f1"] for r in records])), 4),
    }
    if k_max:
        ks = sorted({k for k in list(recall_ks) + [k_read] if k <= k_max})
        report.update({f"answer_recall@{k}": round(v, 4)
                       for k, v in recall_at_k(np.array(hits, dtype=bool), ks).items()})
    else:  # closed book: nothing retrieved
        report.update({f"answer_recall@{k}": None for k in sorted(set(recall_ks))})
    report.update({"questions": len(records), "k": k_read, "seconds": round(seconds, 2),
                   "questions_per_s": round(len(records) / max(seconds, 1e-9), 2)})
    return report


def _evaluate_generative(model: GenerativeOpenQAModel, examples: Sequence[QAExample],
                         recall_ks: Sequence[int], batch_size: int, bf16: bool,
                         progress: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`evaluate_openqa` of a generative model: answers written by its ``decoding`` over
    the top ``model.k`` blocks (closed book: none; ``k`` is then 0 and recall None)."""
    t0 = time.perf_counter()
    store, regex = model.store, model.regex
    k_read = 0 if model.closed_book else model.blocks_read
    k_max = 0 if model.closed_book else min(max(max(recall_ks), k_read), len(store))
    records, hits = [], []
    bar = tqdm(total=len(examples), desc="evaluate", unit="q", disable=not progress,
               mininterval=1.0)
    with eval_mode(model), autocast(bf16, model.generator.device):
        for lo in range(0, len(examples), batch_size):
            batch = list(examples[lo: lo + batch_size])
            questions = [ex.question for ex in batch]
            logits, ids = model.retrieve(questions, max(k_max, 1))
            decoded, _ = model.generate(questions, ids[:, :max(k_read, 1)],
                                        logits[:, :max(k_read, 1)])
            for i, ex in enumerate(batch):
                prediction, posterior = decoded.answers[i], decoded.posteriors[i].tolist()
                if k_max:
                    hits.append([has_answer(store.text(int(b)), ex.answers, regex=regex)
                                 for b in ids[i]])
                read = [(int(b), float(s), p) for b, s, p in
                        zip(ids[i][:k_read], logits[i][:k_read].tolist(), posterior)]
                records.append({
                    "question": ex.question, "prediction": prediction, "gold": ex.answers,
                    "exact_match": exact_match(prediction, ex.answers, regex=regex),
                    "f1": 0.0 if regex else f1_score(prediction, ex.answers),
                    "retrieved": [{"title": store.title(b), "block": b, "score": round(s, 4),
                                   "probability": round(p, 4)} for b, s, p in read],
                    "answer_block": (store.title(max(read, key=lambda r: r[2])[0])
                                     if read else None),
                })
            bar.update(len(batch))
    bar.close()
    return _report(records, hits, recall_ks, k_read, k_max, regex, t0), records


def write_predictions(records: Sequence[dict[str, Any]], path: str) -> None:
    """Predictions as jsonl, complete or absent (:func:`realm.fsutil.write_lines_atomic`)."""
    write_lines_atomic(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                       "the predictions")
