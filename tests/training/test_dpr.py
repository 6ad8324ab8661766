"""DPR: mined positives and hard negatives, the loss, and the stage end to end on real SQuAD
questions over their passages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from realm.config import load_config
from realm.data.qa import QAExample, read_qa
from realm.data.store import BlockStore
from realm.metrics import has_answer
from realm.retrieval.search import BM25Searcher
from realm.losses import in_batch_nce
from realm.modeling.retriever import Retriever
from realm.tracking import read_metrics
from realm.training.dpr import AnswerMatcher, mine_pairs, run_train_retriever

#: end-to-end runs of the stage: the full suite (`pytest`) runs them, the fast tier does not
pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def squad_dpr(make_squad_slice, tmp_path_factory):
    """30 SQuAD-open passages and 16 training questions whose gold passage is among them."""
    return make_squad_slice(tmp_path_factory.mktemp("squad-dpr"), 30, slice(None, 80, 5), 160)


def test_mined_pairs_follow_dprs_rules(squad_dpr):
    store = BlockStore(str(squad_dpr / "corpus"))
    qa = read_qa(str(squad_dpr / "qa.jsonl"))
    qa.append(QAExample("Who wrote Hamlet?", ["zzqx never in the corpus"]))
    qa.append(QAExample(qa[0].question, qa[0].answers))  # the same question without a gold passage
    ranked = BM25Searcher(store).search([q.question for q in qa], 20).block_ids
    pairs = mine_pairs(store, qa, ranked, hard_negatives=2, seed=0, progress=False)
    assert pairs.positive[-2] == -1  # no block holds the answer: left out
    assert pairs.negatives.shape == (len(qa), 2) and (pairs.negatives >= 0).all()
    for q, ex in enumerate(qa):
        if pairs.positive[q] < 0:
            continue
        block = int(pairs.positive[q])
        assert has_answer(store.text(block), ex.answers)
        rank = list(ranked[q]).index(block)
        if pairs.from_gold[q]:
            assert store.article_id(block) == ex.gold_passage
            # no better-ranked block of the gold article holds an answer
            assert not any(store.article_id(int(b)) == ex.gold_passage
                           and has_answer(store.text(int(b)), ex.answers) for b in ranked[q][:rank])
        else:  # the best-ranked block with an answer
            assert not any(has_answer(store.text(int(b)), ex.answers) for b in ranked[q][:rank])
        for b in pairs.negatives[q]:
            assert not has_answer(store.text(int(b)), ex.answers) and b != block
    assert pairs.from_gold[:-2].mean() > 0.8  # SQuAD questions: the gold passage has the answer
    assert not pairs.from_gold[-1]  # (no gold passage given)
    # the same positive as the gold one, or a better-ranked block of another article
    assert list(ranked[-1]).index(pairs.positive[-1]) <= list(ranked[0]).index(pairs.positive[0])


def test_answer_matcher_is_dprs_has_answer(squad_dpr):
    store = BlockStore(str(squad_dpr / "corpus"))
    match = AnswerMatcher(store)
    for q in read_qa(str(squad_dpr / "qa.jsonl"))[:8]:
        for block in range(0, len(store), 3):
            assert match(block, q.answers) == has_answer(store.text(block), q.answers)
    regex = AnswerMatcher(store, regex=True)
    assert regex(0, [r"\w+"]) and not regex(0, ["zzqx+"])


def test_hard_negatives_are_extra_columns_of_the_nce():
    torch.manual_seed(0)
    q, p, h = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    loss, scores = in_batch_nce(q, torch.cat([p, h]))
    assert scores.shape == (4, 8)
    direct = -torch.stack([torch.log_softmax(torch.cat([q[i] @ p.T, q[i] @ h.T]), 0)[i]
                           for i in range(4)]).mean()
    assert torch.allclose(loss, direct, atol=1e-6)


def _overrides(squad, encoder, run_dir, **extra):
    base = {"corpus": str(squad / "corpus"),
            "retriever_training.train_qa": str(squad / "qa.jsonl"),
            "retriever_training.dev_qa": str(squad / "qa.jsonl"),
            "retriever_training.positive_search": 20, "retriever_training.recall_ks": "[1,5]",
            "retriever.encoder": encoder, "retriever.dim": 16, "retriever.max_block_tokens": 160,
            "train.run_dir": str(run_dir), "train.steps": 40, "train.batch_size": 4,
            "train.lr": 3e-3, "train.warmup_steps": 2, "train.eval_every": 0,
            "train.save_every": 20, "logging.log_every": 1, "logging.wandb": "false"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_dpr_learns_its_training_questions(squad_dpr, tiny_encoder, tmp_path):
    run = tmp_path / "run"
    summary = run_train_retriever(load_config(overrides=_overrides(squad_dpr, tiny_encoder, run)),
                                  progress=False)
    assert summary["steps"] == 40 and summary["train_questions"] == 16
    assert summary["train_questions_with_positive"] == 16 and summary["positives_from_gold"] >= 13
    assert summary["negatives_per_query"] == 4 * 2 - 1
    records = [r for r in read_metrics(str(run)) if "loss" in r]
    losses = [r["loss"] for r in records]
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    assert all(0 <= r["positive_over_hard"] <= 1 for r in records)
    before, after = summary["dev_before"], summary["dev"]
    assert before["questions"] == after["questions"] == 16
    # a random tiny encoder learns its 16 questions' passages
    assert after["answer_recall@1"] >= before["answer_recall@1"] + 0.25, (before, after)
    reloaded = Retriever.from_pretrained(summary["retriever"])
    assert reloaded.dim == 16 and reloaded.tokenizer is not None
    manifest = json.loads((run / "retriever" / "manifest.json").read_text())
    assert manifest["metadata"]["stage"] == "train_retriever"


def test_cli_evaluates_the_trained_retriever_and_refuses_unanswerable_data(squad_dpr, tiny_encoder,
                                                                          tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "train_retriever.py"), "--no-progress",
           *_overrides(squad_dpr, tiny_encoder, run, **{"train.steps": 6,
                                                      "retriever_training.evaluate_before":
                                                      "false"})]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["dev_before"] == {} and summary["steps"] == 6
    # launch/evaluate.py retrieval reads the run directory's retriever: the same figures
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "evaluate.py"), "retrieval", "--retriever",
         summary["retriever"], "--corpus", str(squad_dpr / "corpus"), "--qa",
         str(squad_dpr / "qa.jsonl"), "--k", "1,5", "--max-block-tokens", "160", "--no-progress"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["answer_recall@1"] == summary["dev"]["answer_recall@1"]
    assert report["answer_recall@5"] == summary["dev"]["answer_recall@5"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Who wrote Hamlet?", "answers": ["zzqx nowhere"]}) + "\n")
    done = subprocess.run(
        cmd[:3] + _overrides(squad_dpr, tiny_encoder, tmp_path / "bad-run",
                             **{"retriever_training.train_qa": str(bad)}),
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and str(bad) in done.stderr and "no question" in done.stderr
    assert not (tmp_path / "bad-run" / "retriever").exists()


def test_two_ranks_gather_every_passage_and_end_equal(squad_dpr, tiny_encoder, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "launch" / "train_retriever.py"), "--no-progress",
           *_overrides(squad_dpr, tiny_encoder, run, **{
               "train.steps": 3, "retriever_training.evaluate_before": "false",
               "retriever_training.dev_qa": "null"})]
    done = subprocess.run(cmd, cwd=REPO, env={**ENV, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["weights_in_sync"] is True
    assert summary["negatives_per_query"] == 2 * 4 * 2 - 1 and summary["dev"] == {}
    negatives = {r["negatives"] for r in read_metrics(str(run)) if "negatives" in r}
    assert negatives == {2 * 4 * 2 - 1}  # both ranks' positives and hard negatives


def test_openqa_retriever_dpr_is_prepared_once_and_cached(squad_dpr, tiny_encoder, tmp_path):
    """`openqa.retriever=dpr`: a DPR retriever trained on the Open-QA questions, cached by key."""
    from realm.training.prepare import prepare_dpr_retriever
    from realm.training.openqa import run_finetune

    cache = tmp_path / "cache"
    overrides = [f"corpus={squad_dpr / 'corpus'}", f"openqa.train_qa={squad_dpr / 'qa.jsonl'}",
                 f"openqa.dev_qa={squad_dpr / 'qa.jsonl'}", "openqa.retriever=dpr",
                 "openqa.dpr_steps=4", "openqa.dpr_batch_size=4", f"openqa.reader={tiny_encoder}",
                 "openqa.k=2", "openqa.max_joined_tokens=200", "openqa.positive_steps=2",
                 "openqa.recall_ks=[1,2]", f"retriever.encoder={tiny_encoder}", "retriever.dim=16",
                 "retriever.max_block_tokens=160", "retriever_training.positive_search=20",
                 f"cache_dir={cache}", f"train.run_dir={tmp_path / 'openqa'}",
                 "train.steps=2", "train.batch_size=4", "train.save_every=0",
                 "logging.wandb=false"]
    config = load_config(overrides=overrides)
    summary = run_finetune(config, progress=False)
    built = summary["retriever_dir"]
    assert built.startswith(str(cache / "dpr-")) and summary["retriever"] == "dpr"
    manifest = Path(built) / "manifest.json"
    meta = json.loads(manifest.read_text())["metadata"]
    assert meta["stage"] == "train_retriever" and meta["steps"] == 4
    assert summary["dev"]["questions"] == 16 and 0 <= summary["dev"]["answer_recall@1"] <= 1
    stamp = manifest.stat().st_mtime_ns
    assert prepare_dpr_retriever(config, str(squad_dpr / "corpus")) == built  # reused as is
    assert manifest.stat().st_mtime_ns == stamp
    other = load_config(overrides=overrides + ["openqa.dpr_steps=3"])
    rebuilt = prepare_dpr_retriever(other, str(squad_dpr / "corpus"))
    assert rebuilt != built and json.loads((Path(rebuilt) / "manifest.json").read_text())[
        "metadata"]["steps"] == 3
    assert not any(p.name.endswith(".tmp") or ".tmp-" in p.name for p in cache.iterdir())


def test_index_negatives_are_the_best_ranked_blocks_without_an_answer(squad_dpr, tiny_retriever):
    from realm.modeling.embed import embed_blocks, special_ids
    from realm.index.mips import SearchResult, build_index, search
    from realm.training.dpr import IndexNegatives

    store = BlockStore(str(squad_dpr / "corpus"))
    retriever = Retriever.from_pretrained(tiny_retriever)
    special = special_ids(retriever.tokenizer)
    reps, _ = embed_blocks(retriever, store, special, max_block_tokens=160, progress=False)
    index = build_index(reps)
    qa = read_qa(str(squad_dpr / "qa.jsonl"))[:6]
    ids = [np.asarray(retriever.tokenizer(q.question, add_special_tokens=False)["input_ids"])
           for q in qa]
    mined = IndexNegatives(lambda q, k: SearchResult(*search(index, q, k)), store, [q.answers for q in qa], 2,
                           len(store), special, 48)
    positives = [0, 1, 2, 3, 4, 5]
    negatives = mined(retriever, ids, positives, range(6))
    from realm.modeling.embed import embed_queries

    ranked = search(index, embed_queries(retriever, ids, special, 48), len(store))[1]
    for row, (q, positive) in enumerate(zip(qa, positives)):
        allowed = [int(b) for b in ranked[row]
                   if b != positive and not has_answer(store.text(int(b)), q.answers)]
        assert list(negatives[row]) == allowed[:2]  # the best-ranked ones, in order
    assert mined.found == 12 and mined.filled == 0


def test_ance_negatives_come_from_the_refreshed_index(squad_dpr, tiny_encoder, tmp_path):
    """`retriever_training.negatives=index`: the refresher re-embeds the corpus while DPR trains,
    the trainer swaps generations in and mines its negatives from the one in use. On the fixed
    schedule (`refresh.sync`): steps of a tiny model take milliseconds, and how many generations
    an asynchronous refresher commits in 12 of them depends on the machine's speed."""
    run = tmp_path / "run"
    summary = run_train_retriever(load_config(overrides=_overrides(
        squad_dpr, tiny_encoder, run, **{
            "train.steps": 12, "retriever_training.negatives": "index",
            "retriever_training.evaluate_before": "false", "retriever_training.dev_qa": "null",
            "refresh.every_steps": 3, "refresh.poll_s": 0.2, "refresh.sync": "true",
            "train.save_every": 6})),
        progress=False)
    assert summary["negatives"] == "index" and summary["steps"] == 12
    assert summary["generations_swapped"] == 5, summary  # steps 0, 3, 6, 9 and 12
    assert summary["index_negatives"] + summary["random_negatives"] == 12 * 4
    assert summary["index_negatives"] >= 40
    staleness = [r["index/staleness_steps"] for r in read_metrics(str(run))
                 if "index/staleness_steps" in r]
    assert len(staleness) == 12 and max(staleness) == summary["max_staleness_steps"] >= 1
    assert min(staleness) >= 0
    with pytest.raises(Exception, match="hard_negatives"):
        load_config(overrides=["retriever_training.negatives=index",
                               "retriever_training.hard_negatives=0"])
