"""DRAMA-style augmentation with the packaged SmolLM2-135M-Instruct, on real lead sections."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from realm.config import load_config
from realm.training.augment import augment_queries, clean_question, crop_query
from realm.data.pairs import read_triplets
from realm.data.store import BlockStore
from realm.training.dpr import run_train_retriever

#: end-to-end runs of the stage: the full suite (`pytest`) runs them, the fast tier does not
pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]


def test_crop_query_and_clean_question():
    rng = np.random.default_rng(0)
    text = "Tiny. The cat sat on the mat today. Dogs bark at night in the city! Ok."
    crops = {crop_query(text, rng) for _ in range(20)}
    assert crops == {"The cat sat on the mat today.", "Dogs bark at night in the city!"}
    assert crop_query("Too short. Also short.", rng) is None
    assert len(crop_query(" ".join(["word"] * 50) + ".", rng, max_words=8).split()) == 8
    assert clean_question('\n Question: "Who built it?"\nmore') == "Who built it?"
    assert clean_question("  \n ") is None


def test_augment_writes_labelled_triplets_resumes_and_trains_dpr(smollm2, leads_corpus,
                                                                tiny_encoder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # SmolLM2's first 8 of 30 layers: the whole pipeline at a quarter of the cost (the full
    # model's questions and throughput are in docs/results.md)
    llm = tmp_path / "smollm2-L8"
    AutoModelForCausalLM.from_pretrained(smollm2, num_hidden_layers=8).save_pretrained(llm)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(llm)
    out = tmp_path / "aug"
    cmd = [sys.executable, str(REPO / "launch" / "augment_queries.py"), "--corpus", leads_corpus,
           "--output", str(out), "--limit", "3", "--candidates", "3", "--batch-size", "3",
           "--max-new-tokens", "16", "--llm", str(llm), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    settings = dict(llm=str(llm), limit=3, candidates=3, batch_size=3, max_new_tokens=16,
                    progress=False)
    summary = augment_queries(leads_corpus, str(out), **settings)  # the command's function
    store = BlockStore(leads_corpus)
    records = [json.loads(line) for line in open(out / "triplets.jsonl")]
    assert summary["records"] == len(records) and summary["by_kind"]["crop"] == 3
    assert 1 <= summary["by_kind"]["llm"] <= 3 and summary["queries_per_s"] > 0
    assert summary["corpus_fingerprint"] == store.fingerprint and not summary["resumed"]
    assert len({r["source"] for r in records}) == 3
    for r in records:
        assert len(r["candidates"]) == 3 and r["source"] in r["candidates"]
        assert sorted([r["positive"], *r["negatives"]]) == sorted(r["candidates"])
        scores = dict(zip(r["candidates"], r["scores"]))
        assert scores[r["positive"]] == max(r["scores"]) < 0  # mean log-probabilities
        assert [scores[z] for z in r["negatives"]] == sorted(
            [scores[z] for z in r["negatives"]], reverse=True)
        if r["kind"] == "crop":  # the words of a sentence of its block
            assert r["query"] in " ".join(store.text(r["source"]).split())
    assert summary["positive_is_source"] == round(
        float(np.mean([r["positive"] == r["source"] for r in records])), 4)
    # killed mid-write: a torn line and no manifest; the command finishes what is missing
    lines = (out / "triplets.jsonl").read_text().splitlines(keepends=True)
    last_source = json.loads(lines[-1])["source"]
    kept = [line for line in lines if json.loads(line)["source"] != last_source]
    (out / "triplets.jsonl").write_text("".join(kept) + '{"query": "tor')
    (out / "manifest.json").unlink()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 3 source blocks done" in again.stderr
    redone = [json.loads(line) for line in open(out / "triplets.jsonl")]
    key = lambda r: (r["source"], r["kind"])  # noqa: E731
    assert sorted(map(key, redone)) == sorted(map(key, records))
    # what was kept is kept; the redone crop is the same (its sentence is seeded by the block)
    same = [r for r in records if r["source"] != last_source or r["kind"] == "crop"]
    assert all(r in redone for r in same)
    with pytest.raises(ValueError, match="other settings"):
        augment_queries(leads_corpus, str(out), **{**settings, "candidates": 4})
    # the DPR stage reads them: positives and best-scored distractors
    queries, pairs = read_triplets(str(out), store, hard_negatives=1)
    assert [q.question for q in queries] == [r["query"] for r in redone]
    assert list(pairs.positive) == [r["positive"] for r in redone]
    assert list(pairs.negatives[:, 0]) == [r["negatives"][0] for r in redone]
    summary = run_train_retriever(load_config(overrides=[
        f"corpus={leads_corpus}", f"retriever_training.triplets={out}",
        f"retriever.encoder={tiny_encoder}", "retriever.dim=16", "retriever.max_block_tokens=128",
        f"train.run_dir={tmp_path / 'dpr'}", "train.steps=2", "train.batch_size=2",
        "train.eval_every=0", "train.save_every=0", "logging.wandb=false"]), progress=False)
    assert summary["train_questions_with_positive"] == len(redone) and summary["steps"] == 2
    assert summary["triplets"] == str(out) and np.isfinite(summary["final_loss"])
    # DRAMA-style data beside human questions (BM25-mined): both in one training set
    qa = tmp_path / "qa.jsonl"
    titles = [store.title(b) for b in range(3)]
    qa.write_text("".join(json.dumps({"question": f"what is {t}?", "answers": [t]}) + "\n"
                          for t in titles))
    both = run_train_retriever(load_config(overrides=[
        f"corpus={leads_corpus}", f"retriever_training.triplets={out}",
        "retriever_training.triplets_with_questions=true", f"retriever_training.train_qa={qa}",
        f"retriever.encoder={tiny_encoder}", "retriever.dim=16", "retriever.max_block_tokens=128",
        f"train.run_dir={tmp_path / 'dpr-both'}", "train.steps=1", "train.batch_size=2",
        "train.eval_every=0", "train.save_every=0", "logging.wandb=false"]), progress=False)
    assert both["train_questions_with_positive"] == len(redone) + 3


def test_triplets_over_another_corpus_are_refused(tmp_path, leads_corpus):
    store = BlockStore(leads_corpus)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_triplets(str(tmp_path), store, 1)
    (tmp_path / "manifest.json").write_text(json.dumps({"corpus_fingerprint": "0" * 32,
                                                        "corpus": "/elsewhere"}))
    with pytest.raises(ValueError, match="/elsewhere") as err:
        read_triplets(str(tmp_path), store, 1)
    assert store.fingerprint in str(err.value)
    (tmp_path / "manifest.json").write_text(json.dumps({"corpus_fingerprint": store.fingerprint}))
    good = {"query": "q?", "positive": 0, "negatives": [1]}
    (tmp_path / "triplets.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(
        {**good, "negatives": [len(store)]}) + "\n")
    with pytest.raises(ValueError, match=r"triplets.jsonl:2: block ids \[%d\]" % len(store)):
        read_triplets(str(tmp_path), store, 1)


def test_a_directory_that_is_no_instruction_tuned_causal_lm_is_refused(tiny_encoder, tmp_path):
    from realm.training.augment import LanguageModel

    # a BERT directory (transformers loads BERT as a causal LM too, but it has no chat template)
    with pytest.raises(ValueError, match="instruction-tuned causal LM is needed"):
        LanguageModel(tiny_encoder)
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(ValueError, match="not a causal language model"):
        LanguageModel(str(tmp_path))
