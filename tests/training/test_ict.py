"""ICT through the shared training core: the loss falls, resume is exact, two ranks agree."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from realm.config import load_config
from realm.data.ict import ICTDataset, ict_blocks
from realm.data.store import BlockStore
from realm.modeling.retriever import Retriever
from realm.tracking import read_metrics
from realm.training.checkpoint import checkpoints
from realm.training.ict import run_ict

REPO = Path(__file__).resolve().parents[2]


def _overrides(corpus, encoder, run_dir, **extra):
    base = {"corpus": corpus, "retriever.encoder": encoder, "train.run_dir": str(run_dir),
            "train.batch_size": 16, "train.lr": 5e-3, "train.warmup_steps": 2,
            "train.eval_every": 0, "train.save_every": 0, "ict.holdout_blocks": 50,
            "logging.log_every": 1, "retriever.max_block_tokens": 128}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_ict_examples_remove_the_query_sentence(leads_corpus):
    store = BlockStore(leads_corpus)
    blocks = ict_blocks(store)
    assert len(blocks) > 200 and all(store.blocks["n_sents"][blocks] >= 2)
    removed = ICTDataset(store, blocks, remove_prob=1.0, seed=3)
    kept = ICTDataset(store, blocks, remove_prob=0.0, seed=3)
    for i in range(20):
        a, b = removed[i], kept[i]
        body = store.body_ids(a.block_id).tolist()
        q = a.query_ids.tolist()
        assert q == b.query_ids.tolist()  # same seed, same sentence
        assert b.body_ids.tolist() == body  # kept whole
        assert len(a.body_ids) == len(body) - len(q) or len(q) == 64  # the sentence is gone
        starts = [j for j in range(len(body) - len(q) + 1) if body[j:j + len(q)] == q]
        assert starts, "the query is a span of its block"
    removed.set_epoch(1)
    assert any(removed[i].query_ids.tolist() != kept[i].query_ids.tolist() for i in range(20))


@pytest.mark.slow
def test_ict_loss_falls_and_in_batch_accuracy_rises(leads_corpus, tiny_encoder, tmp_path):
    config = load_config(overrides=_overrides(leads_corpus, tiny_encoder, tmp_path / "run",
                                              **{"train.steps": 40, "train.eval_every": 40,
                                                 "ict.holdout_blocks": 100}))
    summary = run_ict(config, progress=False)
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    accuracy = [r["in_batch_accuracy"] for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert np.mean(accuracy[-5:]) > np.mean(accuracy[:5]) + 0.05
    # held-out sentences find their source block among the 100 held-out blocks far above
    # chance (recall@k = k/100 for a retriever that learned nothing; with 100 queries the
    # binomial sd at k=20 is 0.04). Measured: 0.05 / 0.12 / 0.37 at k = 1 / 5 / 20.
    assert summary["ict_recall@1"] >= 0.03 and summary["ict_recall@20"] >= 0.28, summary
    reloaded = Retriever.from_pretrained(summary["retriever"])
    assert reloaded.dim == 128 and reloaded.tokenizer is not None
    # the offline dashboard draws an ICT run too: its loss and in-batch accuracy
    from realm.report import write_report

    page = write_report(str(tmp_path / "run"))
    html = open(page, encoding="utf-8").read()
    for stem in ("loss", "accuracy", "lr"):
        assert f"src='{stem}.png'" in html and (tmp_path / "run" / "report" / f"{stem}.png").is_file()


def test_resume_continues_exactly(leads_corpus, tiny_encoder, tmp_path):
    run = tmp_path / "run"
    overrides = _overrides(leads_corpus, tiny_encoder, run,
                           **{"train.steps": 8, "train.save_every": 4, "train.keep_checkpoints": 3})
    first = run_ict(load_config(overrides=overrides), progress=False)
    full = Retriever.from_pretrained(first["retriever"]).state_dict()
    assert [s for s, _ in checkpoints(str(run))] == [4, 8]
    # as if the run had died after step 4: drop what came later, run the same command again
    shutil.rmtree(run / "checkpoints" / "step-000008")
    shutil.rmtree(run / "retriever")
    second = run_ict(load_config(overrides=overrides), progress=False)
    assert second["resumed_from"].endswith("step-000004") and second["steps"] == 8
    resumed = Retriever.from_pretrained(second["retriever"]).state_dict()
    for name, tensor in full.items():
        assert torch.equal(tensor, resumed[name]), name
    assert second["final_loss"] == pytest.approx(first["final_loss"], abs=1e-6)


@pytest.mark.slow
def test_two_ranks_share_negatives_and_end_equal(leads_corpus, tiny_encoder, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "launch" / "ict.py"), "--no-progress",
           *_overrides(leads_corpus, tiny_encoder, run, **{"train.steps": 6, "train.batch_size": 8})]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["weights_in_sync"] is True
    negatives = {r["negatives"] for r in read_metrics(str(run)) if "negatives" in r}
    assert negatives == {2 * 8 - 1}  # both ranks' blocks are negatives for every query


def test_retriever_with_another_tokenizer_is_refused(leads_corpus):
    from tokenizers import normalizers

    from realm.hub import load_tokenizer
    from realm.data.store import check_tokenizer

    store = BlockStore(leads_corpus)
    same = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    check_tokenizer(same, store)  # the corpus was cut with this one
    cased = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    cased.backend_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    with pytest.raises(ValueError, match="rebuild the corpus"):
        check_tokenizer(cased, store)


def test_gradient_accumulation_and_forced_bf16(leads_corpus, tiny_encoder, tmp_path):
    run = tmp_path / "run"
    config = load_config(overrides=_overrides(leads_corpus, tiny_encoder, run, **{
        "train.steps": 3, "train.batch_size": 4, "train.grad_accum": 2, "train.precision": "bf16"}))
    summary = run_ict(config, progress=False)
    assert summary["steps"] == 3 and summary["precision"] == "bf16"
    records = [r for r in read_metrics(str(run)) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]  # one record per optimizer step, not per micro-batch
    # warmup 2 then linear decay over 3 optimizer steps; stepped per micro-batch it would be [5e-3, 0, 0]
    assert [r["lr"] for r in records] == pytest.approx([5e-3, 5e-3, 0.0])
    assert all(np.isfinite(r["loss"]) for r in records)
