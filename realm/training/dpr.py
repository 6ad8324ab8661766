"""Supervised dense retriever training from question-passage pairs (DPR, Karpukhin et al. 2020).

    accelerate launch launch/train_retriever.py --config configs/dpr_leads.yaml [key=value ...]

Per training question (``retriever_training.train_qa``):

- **positive**: with a ``gold_passage`` (an article id of the corpus), the best-ranked BM25 block
  of that article whose text holds an answer; otherwise (and where the gold article has none in
  the searched blocks) the best-ranked BM25 block whose text holds an answer (DPR's distant
  supervision, its ``has_answer``: answer tokens as a contiguous run of the passage's tokens).
  Questions with no such block in the top ``positive_search`` are counted and left out.
- **hard negatives**: the best-ranked BM25 blocks without an answer (``hard_negatives`` of them;
  a random block where too few were found).

The loss is InfoNCE over the positive, the hard negatives, and every other passage of the global
batch (gathered across ranks, :func:`realm.losses.gather_with_grad`): query ``i`` scores all
``B (1 + n)`` passages, the right one is its own positive. Query and document encoders both
train (separate weights, as DPR's). The run writes ``run_dir/retriever/`` (a retriever directory
that ``openqa.retriever``, ``retriever.encoder`` and ``launch/evaluate.py retrieval --retriever``
read), checkpoints, metrics.jsonl; the summary adds answer recall@k on ``dev_qa`` before and
after training, and how many training questions had a positive.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from realm.config import save_config
from realm.data.pairs import TrainingPairs, fill_random, read_triplets
from realm.data.qa import QAExample
from realm.data.store import BlockStore, check_tokenizer
from realm.retrieval.search import BM25Searcher, DenseSearcher
from realm.evaluate.run import qa_retrieval
from realm.losses import gather_with_grad, in_batch_nce
from realm.metrics import compile_answer_pattern, contains_run, dpr_tokens
from realm.index.mips import check_factory
from realm.modeling.embed import embed_queries, special_ids
from realm.modeling.inputs import build_block_inputs, build_query_inputs
from realm.modeling.modes import eval_mode
from realm.modeling.retriever import Retriever
from realm.precision import cpu_threads
from realm.refresh.hook import RefreshHook
from realm.refresh.supervisor import check_devices
from realm.tracking import Tracker
from realm.training.accelerator import shutdown
from realm.training.core import TrainSettings, train
from realm.training.checkpoint import checkpoints
from realm.modeling.retriever import load_retriever
from realm.training.ict import weights_in_sync
from realm.training.openqa import prepare_qa_stage

logger = logging.getLogger(__name__)


class AnswerMatcher:
    """DPR's ``has_answer`` on block texts, each block tokenized once (many questions search the
    same blocks)."""

    def __init__(self, store: BlockStore, regex: bool = False):
        self.store, self.regex = store, regex
        self._tokens: dict[int, list[str]] = {}
        self._answers: dict[str, list[str]] = {}

    def __call__(self, block: int, answers: Sequence[str]) -> bool:
        if self.regex:
            text = self.store.text(block)
            return any(compile_answer_pattern(p).search(text) for p in answers)
        tokens = self._tokens.get(block)
        if tokens is None:
            tokens = self._tokens[block] = dpr_tokens(self.store.text(block))
        for answer in answers:
            run = self._answers.get(answer)
            if run is None:
                run = self._answers[answer] = dpr_tokens(answer)
            if run and contains_run(tokens, run):
                return True
        return False


def mine_pairs(store: BlockStore, questions: Sequence[QAExample], ranked: np.ndarray,
               hard_negatives: int = 1, regex: bool = False, seed: int = 0,
               progress: bool = True) -> TrainingPairs:
    """Positives and hard negatives from each question's ranked blocks (``[N, K]``, BM25).

    The positive is the best-ranked block of the gold article (``gold_passage``) with an answer,
    else the best-ranked block with an answer; the negatives are the best-ranked blocks without
    one, then random blocks (never the positive) where the search found too few.
    """
    match = AnswerMatcher(store, regex)
    n = len(questions)
    out = TrainingPairs(np.full(n, -1, np.int64), np.full((n, hard_negatives), -1, np.int64),
                        np.zeros(n, bool))
    rng = np.random.default_rng(seed)
    for q, (ex, row) in enumerate(tqdm(list(zip(questions, ranked)), desc="training pairs",
                                       unit="q", disable=not progress, mininterval=1.0)):
        found: list[int] = []
        best = gold = -1
        for block in (int(b) for b in row if b >= 0):
            if match(block, ex.answers):
                if best < 0:
                    best = block
                if ex.gold_passage is not None and gold < 0 \
                        and store.article_id(block) == ex.gold_passage:
                    gold = block
            elif len(found) < hard_negatives:
                found.append(block)
            if len(found) >= hard_negatives and best >= 0 \
                    and (gold >= 0 or ex.gold_passage is None):
                break
        out.positive[q] = gold if gold >= 0 else best
        out.from_gold[q] = gold >= 0
        fill_random(found, hard_negatives, int(out.positive[q]), len(store), rng)
        out.negatives[q, : len(found)] = found
    return out


class PairDataset(torch.utils.data.Dataset):
    """``(question word pieces, positive block, hard negatives)`` of the questions with a
    positive."""

    def __init__(self, questions: Sequence[QAExample], pairs: TrainingPairs, tokenizer,
                 max_query_tokens: int):
        keep = np.flatnonzero(pairs.positive >= 0)
        self.query_ids = [np.asarray(tokenizer(questions[i].question, add_special_tokens=False)
                                     ["input_ids"][:max_query_tokens], np.int64) for i in keep]
        self.answers = [questions[i].answers for i in keep]
        self.positive, self.negatives = pairs.positive[keep], pairs.negatives[keep]

    def __len__(self) -> int:
        return len(self.positive)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, np.ndarray, int]:
        return self.query_ids[i], int(self.positive[i]), self.negatives[i], i


class IndexNegatives:
    """ANCE's negatives (Xiong et al. 2021): each step, the best-ranked blocks of the model's own
    index that hold no answer (and are not the positive), searched with the current query
    encoder; the index is the refresher's newest generation, hot-swapped between steps as in
    pretraining, so it lags the document encoder by up to ``refresh.every_steps`` plus the time
    a refresh takes (logged as ``index/staleness_steps``).

    Args:
        search: ``(queries [n, dim], k) -> SearchResult`` over the generation in use.
        store: The block store.
        answers: Each training row's answers (empty: only the positive is excluded).
        n: Negatives per query.
        search_k: Blocks searched per query.
        special, max_query_tokens: Query encoding.
        regex: Answers are regular expressions.
        seed: Random blocks fill in where the search found too few.
    """

    def __init__(self, search, store: BlockStore, answers: Sequence[Sequence[str]], n: int,
                 search_k: int, special: tuple[int, int, int], max_query_tokens: int,
                 regex: bool = False, seed: int = 0):
        self.search, self.store, self.answers, self.n = search, store, answers, n
        self.search_k, self.special, self.max_query_tokens = search_k, special, max_query_tokens
        self.match = AnswerMatcher(store, regex)
        self.rng = np.random.default_rng(seed)
        self.found = self.filled = 0  # negatives from the index / random

    def __call__(self, retriever: Retriever, query_ids: Sequence[np.ndarray],
                 positives: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        queries = embed_queries(retriever, query_ids, self.special, self.max_query_tokens)
        ranked = self.search(queries, min(self.search_k, len(self.store))).block_ids
        out = np.full((len(rows), self.n), -1, np.int64)
        for q, (row, positive, found) in enumerate(zip(rows, positives, ranked)):
            negatives: list[int] = []
            for block in (int(b) for b in found if b >= 0):
                if len(negatives) == self.n:
                    break
                if block != positive and not self.match(block, self.answers[row]):
                    negatives.append(block)
            self.found += len(negatives)
            self.filled += fill_random(negatives, self.n, positive, len(self.store), self.rng)
            out[q, : len(negatives)] = negatives
        return out


class DPRTask:
    """The training core's task: InfoNCE over positives, hard negatives and the global batch.

    Args:
        dataset: The training pairs.
        store: The block store the pairs point into.
        special: ``(cls_id, sep_id, pad_id)``.
        accelerator: The run's accelerator (cross-rank gathering).
        evaluate_fn: ``retriever -> metrics`` run at ``train.eval_every`` (main process), or None.
        max_query_tokens, max_block_tokens: Word pieces kept when encoding.
    """

    def __init__(self, dataset: PairDataset, store: BlockStore, special: tuple[int, int, int],
                 accelerator, evaluate_fn=None, max_query_tokens: int = 64,
                 max_block_tokens: int = 288, index_negatives: Optional[IndexNegatives] = None):
        self.dataset, self.store, self.special = dataset, store, special
        self.accelerator, self.evaluate_fn = accelerator, evaluate_fn
        self.max_query_tokens, self.max_block_tokens = max_query_tokens, max_block_tokens
        self.index_negatives = index_negatives

    def train_dataset(self) -> PairDataset:
        return self.dataset

    def _blocks(self, positives: Sequence[int], negatives: np.ndarray):
        """The positives in batch order, then every question's hard negatives."""
        cls_id, sep_id, pad_id = self.special
        blocks = list(positives) + [int(b) for row in negatives for b in row]
        return build_block_inputs([self.store.title_ids(b) for b in blocks],
                                  [self.store.body_ids(b) for b in blocks], cls_id, sep_id,
                                  pad_id, max_length=self.max_block_tokens + 3)

    def collate(self, items) -> dict[str, Any]:
        cls_id, sep_id, pad_id = self.special
        query_ids = [q for q, _, _, _ in items]
        query = build_query_inputs(query_ids, cls_id, sep_id, pad_id,
                                   max_length=self.max_query_tokens + 2)
        positives = [p for _, p, _, _ in items]
        batch = {"query": query, "n": len(items)}
        if self.index_negatives is None:
            batch["block"] = self._blocks(positives, np.stack([negs for _, _, negs, _ in items]))
        else:  # searched at the step, with the query encoder as it is then
            batch.update(query_ids=query_ids, positives=positives,
                         rows=[i for _, _, _, i in items])
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        if "block" not in batch:
            negatives = self.index_negatives(self.accelerator.unwrap_model(model),
                                             batch["query_ids"], batch["positives"],
                                             batch["rows"])
            device = batch["query"].input_ids.device
            batch["block"] = type(batch["query"])(*(t.to(device) for t in self._blocks(
                batch["positives"], negatives)))
        q, p, n = batch["query"], batch["block"], batch["n"]
        out = model(q.input_ids, q.attention_mask, p.input_ids, p.attention_mask, p.token_type_ids)
        q_all = gather_with_grad(out.q_reps, self.accelerator)  # [world * B, dim]
        positives = gather_with_grad(out.p_reps[:n], self.accelerator)  # [world * B, dim]
        negatives = gather_with_grad(out.p_reps[n:], self.accelerator)  # [world * B * h, dim]
        loss, scores = in_batch_nce(q_all, torch.cat([positives, negatives]))
        right = torch.arange(len(q_all), device=scores.device)
        accuracy = (scores.argmax(dim=1) == right).float().mean()
        hard = scores[:, len(positives):]
        metrics = {"loss": float(loss.detach()), "in_batch_accuracy": float(accuracy),
                   "negatives": float(scores.shape[1] - 1)}
        if hard.shape[1]:  # how often the positive beats every hard negative
            own = scores.gather(1, right[:, None])
            metrics["positive_over_hard"] = float((own > hard.max(dim=1).values[:, None])
                                                  .float().mean())
        return loss * self.accelerator.num_processes, metrics

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if self.evaluate_fn is None or not self.accelerator.is_main_process:
            return {}
        return self.evaluate_fn(self.accelerator.unwrap_model(model))


def dev_recall(retriever: Retriever, store: BlockStore, questions: Sequence[QAExample],
               ks: Sequence[int], max_block_tokens: int, max_query_tokens: int,
               regex: bool = False, progress: bool = False, precision: str = "auto"
               ) -> dict[str, Any]:
    """Answer recall@k of ``questions`` with ``retriever`` over every block of ``store``."""
    with eval_mode(retriever):
        searcher = DenseSearcher(retriever, store, max_block_tokens, max_query_tokens,
                                 progress=progress, precision=precision)
        return qa_retrieval(searcher, store, list(questions), ks, regex=regex)


def run_train_retriever(config, progress: bool = True) -> dict[str, Any]:
    """The DPR stage (see the module docstring); returns the summary."""
    t0 = time.time()
    d, t, r = config.retriever_training, config.train, config.retriever
    if d.negatives == "index":
        check_devices(config.refresh.devices)
        check_factory(config.index.factory, r.dim)
    corpus_dir, store, train_qa, dev_qa, accelerator, precision = prepare_qa_stage(
        config, d, "retriever_training", progress)
    retriever = load_retriever(r.encoder, r.dim, r.pooling, r.encoder_layers, config.cache_dir,
                               r.max_query_tokens, r.max_block_tokens)
    if retriever.tokenizer is None:
        raise ValueError(f"retriever.encoder={r.encoder!r} has no tokenizer saved with it")
    check_tokenizer(retriever.tokenizer, store)
    special = special_ids(retriever.tokenizer)

    t_mine = time.time()
    pairs = None
    if not d.triplets or d.triplets_with_questions:  # DPR: BM25-mined positives and negatives
        ranked = BM25Searcher(store).search([ex.question for ex in train_qa],
                                            min(d.positive_search, len(store))).block_ids
        pairs = mine_pairs(store, train_qa, ranked, d.hard_negatives, d.regex, config.seed,
                           progress and accelerator.is_main_process)
        logger.info("%d of %d training questions have an answer in their top %d BM25 blocks (%d "
                    "in their gold article); the others are left out (%.1f s)",
                    int((pairs.positive >= 0).sum()), len(train_qa), d.positive_search,
                    int(pairs.from_gold.sum()), time.time() - t_mine)
    if d.triplets:  # DRAMA-style: queries, positives and distractors labelled by an LM
        queries, augmented = read_triplets(d.triplets, store, d.hard_negatives, config.seed)
        logger.info("%d training queries from %s", len(queries), d.triplets)
        if not len(queries):
            raise ValueError(f"retriever_training.triplets: {d.triplets} holds no triplets")
        if pairs is None:
            train_qa, pairs = queries, augmented
        else:  # beside the human questions
            train_qa = [*train_qa, *queries]
            pairs = TrainingPairs(*(np.concatenate([getattr(pairs, f), getattr(augmented, f)])
                                    for f in ("positive", "negatives", "from_gold")))
    dataset = PairDataset(train_qa, pairs, retriever.tokenizer, r.max_query_tokens)
    mine_s = time.time() - t_mine
    if not len(dataset):
        raise ValueError(f"retriever_training.train_qa: no question of {d.train_qa} has an answer "
                         f"in its top {d.positive_search} BM25 blocks of {corpus_dir}")
    dev_during = dev_qa[: d.eval_limit] if d.eval_limit else dev_qa

    def evaluate(model: Retriever) -> dict[str, float]:
        report = dev_recall(model, store, dev_during, d.recall_ks, r.max_block_tokens,
                            r.max_query_tokens, d.regex, precision=config.refresh.precision)
        return {f"dev_{k}": v for k, v in report.items() if k.startswith("answer_recall")}

    before: dict[str, Any] = {}
    if dev_qa and d.evaluate_before and accelerator.is_main_process and not _has_checkpoint(t):
        before = dev_recall(retriever, store, dev_qa, d.recall_ks, r.max_block_tokens,
                            r.max_query_tokens, d.regex, progress, config.refresh.precision)
    hook, index_negatives = None, None
    if d.negatives == "index":  # ANCE: the refresher keeps the model's own index fresh
        config = dataclasses.replace(config, corpus=corpus_dir)
        hook = RefreshHook.from_config(config, accelerator, retriever, accelerator.unwrap_model,
                                       corpus_fingerprint=store.fingerprint, dim=retriever.dim,
                                       cpu_threads=cpu_threads(t.threads),
                                       stage="train_retriever")
        index_negatives = IndexNegatives(hook.searcher(accelerator), store, dataset.answers,
                                         d.hard_negatives, d.index_search, special,
                                         r.max_query_tokens, d.regex, config.seed)
    task = DPRTask(dataset, store, special, accelerator, evaluate if dev_qa else None,
                   r.max_query_tokens, r.max_block_tokens, index_negatives)
    if accelerator.is_main_process:
        save_config(config, t.run_dir)
    accelerator.wait_for_everyone()
    tracker = Tracker.from_config(config, enabled=accelerator.is_main_process,
                                  run_name="train_retriever")
    settings = TrainSettings.from_config(config, progress)
    world_size = accelerator.num_processes
    after: dict[str, Any] = {}
    finished = False
    try:
        result = train(retriever, task, settings, accelerator, tracker,
                       hooks=[hook] if hook else [], config_dict=config.to_dict(),
                       origin={"stage": "train_retriever", "corpus": corpus_dir,
                               "corpus_fingerprint": store.fingerprint})
        finished = True
        in_sync = weights_in_sync(retriever, accelerator)
        out_dir = os.path.join(t.run_dir, "retriever")
        unwrapped = accelerator.unwrap_model(retriever)
        if accelerator.is_main_process:
            meta = {"stage": "train_retriever", "steps": result["steps"],
                    "corpus_fingerprint": store.fingerprint, "train_qa": d.train_qa}
            if dev_qa:
                after = dev_recall(unwrapped, store, dev_qa, d.recall_ks, r.max_block_tokens,
                                   r.max_query_tokens, d.regex, progress,
                                   config.refresh.precision)
                recall = {k: v for k, v in after.items() if k.startswith("answer_recall")}
                tracker.log({f"final/dev_{k}": v for k, v in recall.items()},
                            step=result["steps"])
                meta.update(dev_qa=d.dev_qa, **{f"dev_{k}": v for k, v in recall.items()})
            unwrapped.save_pretrained(out_dir, overwrite=True, metadata=meta)
        accelerator.wait_for_everyone()
    finally:
        if hook is not None:
            hook.close(finished=finished)
        tracker.close()
        del task
        shutdown(accelerator)
    return {
        "stage": "train_retriever", "run_dir": t.run_dir, "retriever": out_dir,
        "corpus": corpus_dir, "triplets": d.triplets, "steps": result["steps"],
        "final_loss": round(result["final_loss"], 5) if np.isfinite(result["final_loss"]) else None,
        "train_questions": len(train_qa), "train_questions_with_positive": len(dataset),
        "positives_from_gold": int(pairs.from_gold.sum()),
        "negatives_per_query": (t.batch_size * (1 + d.hard_negatives)) * world_size - 1,
        "world_size": world_size, "weights_in_sync": in_sync, "precision": precision or "fp32",
        "resumed_from": result["resumed_from"], "examples_per_s": result["examples_per_s"],
        "dev_before": before, "dev": after, "mine_s": round(mine_s, 1),
        "negatives": d.negatives,
        **({"generations_swapped": len(hook.generations_used),
            "max_staleness_steps": hook.max_staleness_steps,
            "index_negatives": index_negatives.found, "random_negatives": index_negatives.filled}
           if hook else {}),
        "seconds": round(time.time() - t0, 1),
    }


def _has_checkpoint(t) -> bool:
    return bool(checkpoints(t.run_dir))
