"""MLM examples from real block stores: salient spans from the store, masks line up, fallbacks."""

from collections import Counter

import numpy as np
import pytest
import torch

from realm.data.mlm import (
    MLMDataset,
    collate_mlm,
    mask_block,
    mlm_blocks,
    pad_ragged,
    span_length_distribution,
)

MASK = 103  # [MASK] in the MiniLM (BERT uncased) vocabulary


def _check_lines_up(store, ex, max_query_tokens):
    """Targets are the body's tokens at the masked positions; the rest of the query is the body."""
    body = np.asarray(store.body_ids(ex.block_id), np.int64)
    window = body[ex.query_start: ex.query_start + len(ex.query_ids)]
    assert 0 < len(ex.query_ids) <= max_query_tokens
    assert len(ex.mask_positions) == len(ex.target_ids) > 0
    assert np.all(np.diff(ex.mask_positions) > 0)
    assert np.array_equal(ex.target_ids, window[ex.mask_positions])
    assert np.all(ex.query_ids[ex.mask_positions] == MASK)
    rest = np.setdiff1d(np.arange(len(window)), ex.mask_positions)
    assert np.array_equal(ex.query_ids[rest], window[rest])


def test_salient_span_masks_exactly_one_span_of_the_store(spans_store):
    ds = MLMDataset(spans_store, MASK, max_query_tokens=64, seed=3)
    with_spans = 0
    for i in range(len(ds)):
        ex = ds[i]
        _check_lines_up(spans_store, ex, 64)
        spans = spans_store.spans(ex.block_id)
        if len(spans) == 0:
            continue
        with_spans += 1
        start = ex.query_start + int(ex.mask_positions[0])
        end = ex.query_start + int(ex.mask_positions[-1]) + 1
        assert np.array_equal(ex.mask_positions, np.arange(start, end) - ex.query_start)
        matches = [s for s in spans if (int(s["start"]), int(s["end"])) == (start, end)]
        assert matches, f"block {ex.block_id}: masked [{start}, {end}) is not one of its spans"
        assert ex.label in {spans_store.label_names[int(s["label"])] for s in matches}
        assert (ex.masking, ex.fallback) == ("salient_span", False)
    assert with_spans >= 40


def test_query_is_the_sentence_holding_the_span(spans_store):
    block = next(i for i in range(len(spans_store)) if len(spans_store.spans(i)))
    ex = mask_block(spans_store, block, np.random.default_rng(0), MASK, max_query_tokens=512)
    start = ex.query_start + int(ex.mask_positions[0])
    end = ex.query_start + int(ex.mask_positions[-1]) + 1
    sents = spans_store.sentences(block)
    covering = sents[(sents["start"] < end) & (sents["end"] > start)]
    assert ex.query_start == covering["start"].min()
    assert ex.query_start + len(ex.query_ids) == covering["end"].max()


def test_short_query_window_keeps_the_span(spans_store):
    ds = MLMDataset(spans_store, MASK, max_query_tokens=8, seed=1)
    for i in range(len(ds)):
        ex = ds[i]
        _check_lines_up(spans_store, ex, 8)


def test_salient_spans_are_chosen_uniformly(spans_store):
    block = max(range(len(spans_store)), key=lambda i: len(spans_store.spans(i)))
    spans = spans_store.spans(block)
    assert len(spans) >= 3
    draws = Counter()
    for seed in range(60 * len(spans)):
        ex = mask_block(spans_store, block, np.random.default_rng(seed), MASK, max_query_tokens=512)
        draws[ex.query_start + int(ex.mask_positions[0]), len(ex.mask_positions)] += 1
    by_span = Counter()
    for s in spans:  # identical (start, end) pairs with two labels count together
        by_span[int(s["start"]), int(s["end"]) - int(s["start"])] += 1
    assert set(draws) == set(by_span)
    for key, n in by_span.items():
        assert abs(draws[key] / (60 * len(spans)) - n / len(spans)) < 0.08


def test_blocks_without_spans_fall_back_to_random_span_and_are_counted(spans_store):
    ds = MLMDataset(spans_store, MASK, seed=0)
    no_span = [i for i in range(len(ds)) if len(spans_store.spans(int(ds.block_ids[i]))) == 0]
    assert ds.n_without_spans == len(no_span) > 0
    for i in no_span:
        ex = ds[i]
        assert (ex.masking, ex.fallback, ex.label) == ("random_span", True, None)
        assert np.array_equal(ex.mask_positions, np.arange(ex.mask_positions[0],
                                                           ex.mask_positions[-1] + 1))
    batch = collate_mlm([ds[i] for i in range(len(ds))])
    assert batch.n_fallback == len(no_span)


def test_blocks_without_spans_can_be_skipped(spans_store, leads_store):
    ids = mlm_blocks(spans_store, with_spans=True)
    n_spans = np.asarray(spans_store.blocks["n_spans"])
    assert 0 < len(ids) < len(spans_store) and (n_spans[ids] > 0).all()
    assert len(ids) == int(((n_spans > 0) & (np.asarray(spans_store.blocks["n_tokens"]) > 0)).sum())
    ds = MLMDataset(spans_store, MASK, block_ids=ids, seed=0)
    assert ds.n_without_spans == 0
    assert collate_mlm([ds[i] for i in range(len(ds))]).n_fallback == 0
    with pytest.raises(ValueError, match="no block has a salient span"):
        mlm_blocks(leads_store, with_spans=True)  # a corpus built without spans


def test_examples_are_deterministic_per_seed_and_epoch(leads_store):
    a = MLMDataset(leads_store, MASK, masking="random_token", seed=7)
    b = MLMDataset(leads_store, MASK, masking="random_token", seed=7)
    for i in (0, 5, 17):
        assert np.array_equal(a[i].query_ids, b[i].query_ids)
        assert np.array_equal(a[i].mask_positions, b[i].mask_positions)
    b.set_epoch(1)
    assert any(not np.array_equal(a[i].query_ids, b[i].query_ids) for i in range(20))


def test_random_token_masks_fifteen_percent_within_one_sentence(leads_store):
    ds = MLMDataset(leads_store, MASK, masking="random_token", max_query_tokens=64, seed=0)
    assert len(ds) == len(mlm_blocks(leads_store)) == len(leads_store)
    for i in range(0, len(ds), 7):
        ex = ds[i]
        _check_lines_up(leads_store, ex, 64)
        assert len(ex.mask_positions) == max(1, round(0.15 * len(ex.query_ids)))
        sents = leads_store.sentences(ex.block_id)
        end = ex.query_start + len(ex.query_ids)
        assert np.any((sents["start"] <= ex.query_start) & (sents["end"] >= end))
        assert (ex.masking, ex.label, ex.fallback) == ("random_token", None, False)


def test_random_span_on_a_corpus_without_spans(leads_store):
    probs = span_length_distribution(leads_store)
    p = 0.3  # the documented geometric default
    direct = np.array([p * (1 - p) ** i for i in range(10)])
    assert np.allclose(probs, direct / direct.sum())
    ds = MLMDataset(leads_store, MASK, masking="random_span", seed=0)
    lengths = []
    for i in range(0, len(ds), 3):
        ex = ds[i]
        _check_lines_up(leads_store, ex, 64)
        assert np.array_equal(ex.mask_positions, np.arange(ex.mask_positions[0],
                                                           ex.mask_positions[-1] + 1))
        assert (ex.masking, ex.fallback) == ("random_span", False)  # asked for, not a fallback
        lengths.append(len(ex.mask_positions))
    assert max(lengths) <= 10 and 2 < np.mean(lengths) < 5


def test_span_length_distribution_follows_the_store(spans_store):
    counts = np.zeros(10)
    for i in range(len(spans_store)):
        for s in spans_store.spans(i):
            counts[min(int(s["end"] - s["start"]), 10) - 1] += 1
    assert np.allclose(span_length_distribution(spans_store), counts / counts.sum())


def test_collate_pads_targets_with_a_mask(spans_store):
    ds = MLMDataset(spans_store, MASK, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate_mlm)
    batch = next(iter(loader))
    examples = [ds[i] for i in range(5)]
    width = max(len(e.target_ids) for e in examples)
    assert batch.target_ids.shape == batch.target_mask.shape == (5, width)
    assert batch.target_ids.dtype == torch.int64 and batch.target_mask.dtype == torch.bool
    for row, ex in enumerate(examples):
        n = len(ex.target_ids)
        assert batch.target_ids[row, :n].tolist() == ex.target_ids.tolist()
        assert batch.target_mask[row].tolist() == [True] * n + [False] * (width - n)
        assert batch.target_ids[row, n:].tolist() == [0] * (width - n)
        assert np.array_equal(batch.mask_positions[row], ex.mask_positions)
        assert np.array_equal(batch.query_ids[row], ex.query_ids)
    assert batch.block_ids.tolist() == [e.block_id for e in examples]
    assert batch.labels == [e.label for e in examples]


def test_pad_ragged():
    values, mask = pad_ragged([[1, 2, 3], [], [4]], pad_value=-1)
    assert values.tolist() == [[1, 2, 3], [-1, -1, -1], [4, -1, -1]]
    assert mask.tolist() == [[True] * 3, [False] * 3, [True, False, False]]


def test_bad_arguments_are_refused(leads_store):
    with pytest.raises(ValueError, match="masking"):
        MLMDataset(leads_store, MASK, masking="whole_word")
    with pytest.raises(ValueError, match="mask_prob"):
        MLMDataset(leads_store, MASK, mask_prob=0.0)
