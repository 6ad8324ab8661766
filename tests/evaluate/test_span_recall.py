"""Held-out span recall: the held-out sentences, and recall@k against a direct computation."""

import numpy as np
import pytest
import torch

from realm.data.mlm import mlm_blocks
from realm.data.store import BlockStore
from realm.evaluate.span_recall import HeldOutSpans, holds_run, span_hits, span_recall
from realm.modeling.embed import embed_blocks, embed_queries, special_ids
from realm.modeling.retriever import Retriever


def test_held_out_spans_are_fixed_one_per_block_each_with_its_span(spans_corpus):
    store = BlockStore(spans_corpus)
    held = HeldOutSpans.draw(store, 103, 8, 32, seed=0)
    again = HeldOutSpans.draw(store, 103, 8, 32, seed=0)
    assert len(held.examples) == 8 and len(set(held.blocks.tolist())) == 8
    with_spans = mlm_blocks(store, with_spans=True)
    assert len(HeldOutSpans.draw(store, 103, 1000, 32).examples) == len(with_spans) // 5
    assert np.array_equal(held.blocks, again.blocks)
    assert [e.block_id for e in held.examples] == held.blocks.tolist()
    for e in held.examples:  # a salient span, masked, from its own block
        assert e.masking == "salient_span" and len(e.target_ids) > 0
        assert holds_run(store, e.block_id, np.asarray(e.target_ids, np.int64))


def test_span_recall_equals_a_direct_computation(spans_corpus, tiny_retriever):
    store = BlockStore(spans_corpus)
    held = HeldOutSpans.draw(store, 103, 30, 32, seed=1)  # (a fifth of the blocks: 11)
    torch.manual_seed(0)
    retriever = Retriever.from_pretrained(tiny_retriever)
    k = 5
    got = span_recall(retriever, store, held, k, 64, 32, precision="fp32")
    special = special_ids(retriever.tokenizer)
    with torch.no_grad():
        blocks, _ = embed_blocks(retriever, store, special, max_block_tokens=64, progress=False)
        queries = embed_queries(retriever, [e.query_ids for e in held.examples], special, 32)
    scores = queries @ blocks.T  # [n, n_blocks]
    scores[np.arange(len(held.examples)), held.blocks] = -np.inf  # own block left out
    top = np.argsort(-scores, axis=1)[:, :k]
    want = [any(holds_run(store, int(b), np.asarray(e.target_ids)) for b in row)
            for e, row in zip(held.examples, top)]
    assert 0 <= got <= 1 and got == np.mean(want)
    hits = span_hits(retriever, store, held, k, 64, 32, precision="fp32")  # per sentence, paired
    assert hits.dtype == bool and hits.tolist() == want


@pytest.mark.slow
def test_evaluate_spans_mode_reports_the_runs_held_out_recall_paired(spans_corpus, tiny_retriever):
    """`launch/evaluate.py spans`: the same held-out sentences as the run draws, recall@k equal
    to span_recall's, and a retriever paired with itself gains and loses nothing."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    launch = Path(__file__).resolve().parents[2] / "launch" / "evaluate.py"
    out = subprocess.run(
        [sys.executable, str(launch), "spans", "--retriever", tiny_retriever,
         "--compare-with", tiny_retriever, "--corpus", str(spans_corpus), "--examples", "30",
         "--seed", "1", "--k", "1,5", "--max-block-tokens", "64", "--precision", "fp32",
         "--no-progress"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    store = BlockStore(spans_corpus)
    retriever = Retriever.from_pretrained(tiny_retriever)
    held = HeldOutSpans.draw(store, retriever.tokenizer.mask_token_id, 30, 32, seed=1)
    assert report["examples"] == len(held.examples)
    for k in (1, 5):
        want = span_recall(retriever, store, held, k, 64, 32, precision="fp32")
        assert report["span_recall"][str(k)] == pytest.approx(want)
        cell = report["paired"][str(k)]
        assert (cell["gained"], cell["lost"], cell["p_value"]) == (0, 0, 1.0)
